"""With nothing evicted, the EvictingCache must reproduce transformers' DynamicCache (fp32, max abs diff 1e-4)."""

import pytest
import torch
from transformers import DynamicCache

import kvevict
from kvevict.compat import cache_kwargs
from kvevict.models import tiny_model

from .conftest import left_padded_batch

TOL = 1e-4


def greedy_logits(model, cache, ids, mask, steps):
    """Prefill then `steps` greedy decode steps; returns [prefill logits, step logits...]."""
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    out = model(input_ids=ids, attention_mask=mask, position_ids=positions, **cache_kwargs(cache))
    logits = [out.logits]
    token = out.logits[:, -1].argmax(-1, keepdim=True)
    for _ in range(steps):
        mask = torch.cat([mask, torch.ones_like(token)], dim=1)
        positions = positions[:, -1:] + 1
        out = model(input_ids=token, attention_mask=mask, position_ids=positions, **cache_kwargs(cache))
        logits.append(out.logits)
        token = out.logits[:, -1].argmax(-1, keepdim=True)
    return logits


def assert_same_logits(model, policy, lengths=(29, 17), steps=32):
    ids, mask = left_padded_batch(lengths)
    with torch.no_grad():
        ref = greedy_logits(model, DynamicCache(config=model.config), ids, mask, steps)
        got = greedy_logits(model, kvevict.EvictingCache(model, policy), ids, mask, steps)
    real = mask.bool()
    for row in range(len(lengths)):  # prefill: compare real (non-padding) positions only
        diff = (ref[0][row][real[row]] - got[0][row][real[row]]).abs().max().item()
        assert diff <= TOL, f"prefill row {row}: {diff}"
    for step, (a, b) in enumerate(zip(ref[1:], got[1:])):
        diff = (a - b).abs().max().item()
        assert diff <= TOL, f"decode step {step}: {diff}"


def test_full_policy_matches_dynamic_cache(family):
    model = tiny_model(family)
    model.set_attn_implementation("sdpa")
    assert_same_logits(model, kvevict.make_policy("full"))


@pytest.mark.parametrize("name", ["snapkv", "h2o", "tova", "knorm", "streamingllm", "window", "random"])
def test_ratio_zero_matches_dynamic_cache(name):
    model = tiny_model("qwen2")
    model.set_attn_implementation("sdpa")
    assert_same_logits(model, kvevict.make_policy(name, compression_ratio=0.0), steps=8)


def test_gemma3_sliding_layers_keep_their_window():
    model = tiny_model("gemma3")
    cache = kvevict.EvictingCache(model, kvevict.make_policy("full"))
    ids, mask = left_padded_batch((60,))
    with torch.no_grad():
        model(input_ids=ids, attention_mask=mask, **cache_kwargs(cache))
    counts = cache.kept_counts()
    window = model.config.sliding_window
    sliding = [i for i, t in enumerate(model.config.layer_types) if t == "sliding_attention"]
    for i in sliding:
        assert counts[i].max() == window - 1
    assert counts[1].min() == 60  # a global layer keeps everything under the full policy


@pytest.mark.slow
def test_smollm2_full_policy_matches_dynamic_cache():
    model, tok = kvevict.load_model("smollm2-135m")
    model.set_attn_implementation("sdpa")
    enc = tok(["The capital of France is", "Once upon a time, in a small village by the sea, there lived"],
              return_tensors="pt", padding=True)
    with torch.no_grad():
        ref = greedy_logits(model, DynamicCache(config=model.config), enc.input_ids, enc.attention_mask, 32)
        got = greedy_logits(model, kvevict.EvictingCache(model, kvevict.make_policy("full")),
                            enc.input_ids, enc.attention_mask, 32)
    real = enc.attention_mask.bool()
    for row in range(2):
        assert (ref[0][row][real[row]] - got[0][row][real[row]]).abs().max() <= TOL
    for a, b in zip(ref[1:], got[1:]):
        assert (a - b).abs().max() <= TOL
