"""After an eviction the cache holds exactly what the policy selected, and attention over it equals attention
over the full cache with the evicted keys masked out."""

import math

import pytest
import torch
import torch.nn.functional as F
from transformers import AttentionInterface, DynamicCache

import kvevict
from kvevict.compat import cache_kwargs
from kvevict.models import tiny_model

from .conftest import left_padded_batch

PROMPT = 48


def reference_run(model, ids):
    """Eager forward of the whole prompt: attention maps [L][B, Hq, T, T] and keys [L][B, H, T, d]."""
    model.set_attn_implementation("eager")
    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        out = model(input_ids=ids, **cache_kwargs(cache), output_attentions=True)
    keys = [layer.keys for layer in cache.layers]
    return out.attentions, keys


def evicted_cache(model, ids, policy):
    cache = kvevict.EvictingCache(model, policy)
    with torch.no_grad():
        model(input_ids=ids, **cache_kwargs(cache))
    return cache


def kept_sets(cache, layer):
    return [set(p.tolist()) for p in cache.kept_positions(layer)[0]]


def expected_uniform(scores, k, protected):
    """Per head: protected positions plus the best-scoring others, k in total. scores [H, T]."""
    out = []
    for h in range(scores.shape[0]):
        s = scores[h].clone()
        s[list(protected)] = float("inf")
        out.append(set(s.topk(k).indices.tolist()))
    return out


@pytest.fixture
def setup():
    model = tiny_model("llama", num_hidden_layers=2)
    ids, _ = left_padded_batch((PROMPT,), seed=3)
    return model, ids


def test_knorm_keeps_smallest_key_norms(setup):
    model, ids = setup
    _, keys = reference_run(model, ids)
    cache = evicted_cache(model, ids, kvevict.make_policy("knorm", compression_ratio=0.5))
    k = math.ceil(0.5 * PROMPT)
    for layer in range(2):
        expected = expected_uniform(-keys[layer][0].norm(dim=-1), k, set())
        assert kept_sets(cache, layer) == expected


def test_snapkv_keeps_top_pooled_window_attention(setup):
    model, ids = setup
    attn, _ = reference_run(model, ids)
    w, kernel = 8, 5
    policy = kvevict.make_policy("snapkv", compression_ratio=0.6, window=w, observation_window=w, kernel_size=kernel)
    cache = evicted_cache(model, ids, policy)
    k = math.ceil(0.4 * PROMPT)
    H, G = model.config.num_key_value_heads, model.config.num_attention_heads // model.config.num_key_value_heads
    for layer in range(2):
        window_attn = attn[layer][0, :, -w:, :].mean(1)  # [Hq, T]
        pooled = F.avg_pool1d(window_attn[:, None], kernel, 1, kernel // 2, count_include_pad=False)[:, 0]
        scores = pooled.view(H, G, -1).mean(1)
        assert kept_sets(cache, layer) == expected_uniform(scores, k, set(range(PROMPT - w, PROMPT)))


def test_h2o_keeps_heavy_hitters_and_recent_tokens(setup):
    model, ids = setup
    attn, _ = reference_run(model, ids)
    cache = evicted_cache(model, ids, kvevict.make_policy("h2o", compression_ratio=0.5))
    k = math.ceil(0.5 * PROMPT)
    recent = set(range(PROMPT - k // 2, PROMPT))
    H = model.config.num_key_value_heads
    for layer in range(2):
        scores = attn[layer][0].sum(1).view(H, -1, PROMPT).sum(1)  # all query rows, summed over the group
        assert kept_sets(cache, layer) == expected_uniform(scores, k, recent)


def test_tova_keeps_last_query_attention_mean_over_heads(setup):
    model, ids = setup
    attn, _ = reference_run(model, ids)
    cache = evicted_cache(model, ids, kvevict.make_policy("tova", compression_ratio=0.5))
    k = math.ceil(0.5 * PROMPT)
    H = model.config.num_key_value_heads
    for layer in range(2):
        scores = attn[layer][0, :, -1, :].mean(0).expand(H, -1)
        assert kept_sets(cache, layer) == expected_uniform(scores, k, set())


def test_streamingllm_keeps_sinks_and_recent(setup):
    model, ids = setup
    cache = evicted_cache(model, ids, kvevict.make_policy("streamingllm", budget=20))
    expected = set(range(4)) | set(range(PROMPT - 16, PROMPT))
    for layer in range(2):
        assert all(s == expected for s in kept_sets(cache, layer))


@pytest.mark.parametrize("allocation", ["head", "global"])
def test_shared_threshold_allocations(setup, allocation):
    model, ids = setup
    _, keys = reference_run(model, ids)
    policy = kvevict.make_policy("knorm", compression_ratio=0.5, allocation=allocation, head_floor=0.0)
    cache = evicted_cache(model, ids, policy)
    k = math.ceil(0.5 * PROMPT)
    H = model.config.num_key_value_heads
    scores = torch.stack([-keys[layer][0].norm(dim=-1) for layer in range(2)])  # [L, H, T]
    if allocation == "head":
        for layer in range(2):
            top = set(scores[layer].flatten().topk(k * H).indices.tolist())
            expected = [{i % PROMPT for i in top if i // PROMPT == h} for h in range(H)]
            assert kept_sets(cache, layer) == expected
    else:
        top = set(scores.flatten().topk(k * H * 2).indices.tolist())
        for layer in range(2):
            expected = [{i % PROMPT for i in top if i // PROMPT == layer * H + h} for h in range(H)]
            assert kept_sets(cache, layer) == expected
    assert int(cache.kept_counts().sum()) == k * H * 2  # two layers, k tokens per head on average


def test_head_floor_guarantees_each_head_a_share(setup):
    model, ids = setup
    policy = kvevict.make_policy("knorm", compression_ratio=0.75, allocation="head", head_floor=0.5)
    cache = evicted_cache(model, ids, policy)
    k = math.ceil(0.25 * PROMPT)
    assert int(cache.kept_counts().min()) >= math.floor(0.5 * k)


_MASKS: dict[int, torch.Tensor] = {}


def _masked_eager(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """Dense attention over every key, with a per-(layer, KV head) mask of the evicted ones."""
    G = query.shape[1] // key.shape[1]
    key, value = key.repeat_interleave(G, 1), value.repeat_interleave(G, 1)
    logits = query @ key.transpose(-1, -2) * scaling
    T, L = query.shape[2], key.shape[2]
    causal = torch.ones(T, L, dtype=torch.bool).tril(L - T)
    hidden = _MASKS[module.layer_idx].repeat_interleave(G, 1)[:, :, None, :L]  # [B, Hq, 1, L]
    hidden = torch.cat([hidden, torch.zeros(*hidden.shape[:3], L - hidden.shape[-1], dtype=torch.bool)], -1)
    logits = logits.masked_fill(~causal | hidden, float("-inf"))
    return (logits.softmax(-1) @ value).transpose(1, 2), None


@pytest.mark.parametrize("name, args", [("snapkv", {"window": 8, "observation_window": 8}), ("h2o", {}), ("knorm", {})])
def test_attention_over_evicted_cache_equals_masked_full_attention(name, args):
    AttentionInterface.register("test_masked", _masked_eager)
    model = tiny_model("qwen2")
    ids, _ = left_padded_batch((PROMPT,), seed=5)
    policy = kvevict.make_policy(name, compression_ratio=0.5, allocation="head", decode_interval=None, **args)
    cache = evicted_cache(model, ids, policy)
    for layer in range(model.config.num_hidden_layers):
        hidden = torch.ones(1, model.config.num_key_value_heads, PROMPT, dtype=torch.bool)
        for h, kept in enumerate(cache.kept_positions(layer)[0]):
            hidden[0, h, kept] = False
        _MASKS[layer] = hidden
    assert int(cache.kept_counts().sum()) < PROMPT * model.config.num_key_value_heads * model.config.num_hidden_layers
    reference = DynamicCache(config=model.config)
    ref_model = tiny_model("qwen2")
    tokens = torch.randint(3, 300, (1, 6))
    with torch.no_grad():
        ref_model(input_ids=ids, **cache_kwargs(reference))
        ref_model.set_attn_implementation("test_masked")
        for t in range(tokens.shape[1]):
            got = model(input_ids=tokens[:, t:t + 1], **cache_kwargs(cache)).logits
            want = ref_model(input_ids=tokens[:, t:t + 1], **cache_kwargs(reference)).logits
            assert (got - want).abs().max() <= 1e-4
