"""Sizing edge cases: protected tokens, short prompts, chunks, one-token chunks, memory bounds, padding."""

import pytest
import torch

import kvevict
from kvevict.api import prefill
from kvevict.compat import cache_kwargs
from kvevict.models import tiny_model

from .conftest import left_padded_batch


def prefilled(model, policy, ids, mask=None, chunk=None):
    cache = kvevict.EvictingCache(model, policy)
    prefill(model, cache, ids, torch.ones_like(ids) if mask is None else mask, chunk)
    return cache


def metadata_nbytes(cache):
    return sum(layer.store.metadata_nbytes() for layer in cache.layers if layer.store is not None)


def test_protected_window_above_the_target_is_kept_whole_with_one_warning():
    """snapkv's default window (64) exceeds the target of a 100-token prompt at 0.5: the newest tokens stay."""
    model = tiny_model("llama")
    ids, _ = left_padded_batch((100,), seed=1)
    with pytest.warns(UserWarning, match=r"protected tokens .*window=64.* target \[50\]") as caught:
        cache = prefilled(model, kvevict.make_policy("snapkv", compression_ratio=0.5), ids)
        cache.evict()  # a second eviction of the same cache does not warn again
    assert len([w for w in caught if "protected tokens" in str(w.message)]) == 1
    for layer in range(len(cache.layers)):
        for kept in cache.kept_positions(layer)[0]:
            assert set(range(36, 100)) <= set(kept.tolist())  # the whole window, position 99 included
            assert len(kept) == 64


def test_sinks_survive_chunked_prefill():
    """streamingllm 0.75 in chunks of 4: the first chunk's target is 1, yet its 4 sinks are never evicted."""
    model = tiny_model("llama")
    ids, _ = left_padded_batch((77,), seed=2)
    cache = prefilled(model, kvevict.make_policy("streamingllm", compression_ratio=0.75), ids, chunk=4)
    target = 20  # ceil(0.25 * 77)
    for layer in range(len(cache.layers)):
        for kept in cache.kept_positions(layer)[0]:
            assert kept.tolist() == [0, 1, 2, 3] + list(range(77 - target + 4, 77))


def test_sinks_of_a_left_padded_row_survive_chunks_with_few_real_tokens():
    model = tiny_model("qwen3")
    ids, mask = left_padded_batch((40, 6), seed=3)  # row 1: its first chunk holds 2 real tokens
    cache = prefilled(model, kvevict.make_policy("streamingllm", compression_ratio=0.75), ids, mask, chunk=4)
    for layer in range(len(cache.layers)):
        kept = cache.kept_positions(layer)[1]
        for positions in kept:  # 6 real tokens: target 2, but the 4 sinks stay
            assert positions.tolist() == [0, 1, 2, 3]


def test_one_token_prompt_chunks_are_prefill():
    model = tiny_model("llama")
    ids, _ = left_padded_batch((99,), seed=4)
    cache = prefilled(model, kvevict.make_policy("window", compression_ratio=0.75), ids, chunk=1)
    assert cache.kept_counts().eq(25).all()  # ceil(0.25 * 99)
    assert cache.phase == "prefill"


@pytest.mark.parametrize("decode_interval", [None, 1, 16, 128])
def test_evicting_cache_never_holds_more_than_the_full_cache(decode_interval):
    """A 100-token prompt at 0.5, then 40 decode steps: never above the full cache's bytes (+ metadata)."""
    model = tiny_model("llama")
    ids, mask = left_padded_batch((100, 63), seed=5)
    policy = kvevict.make_policy("h2o", compression_ratio=0.5, decode_interval=decode_interval)
    cache = prefilled(model, policy, ids, mask)
    assert cache.nbytes() <= cache.full_nbytes() + metadata_nbytes(cache)
    token = torch.full((2, 1), 7)
    with torch.no_grad():
        for _ in range(40):
            mask = torch.cat([mask, torch.ones_like(token)], 1)
            model(input_ids=token, attention_mask=mask, **cache_kwargs(cache))
            assert cache.nbytes() <= cache.full_nbytes() + metadata_nbytes(cache)


def test_gemma3_sliding_layers_hold_no_more_than_their_window():
    model = tiny_model("gemma3")
    ids, _ = left_padded_batch((30,), seed=6)
    cache = prefilled(model, kvevict.make_policy("snapkv", compression_ratio=0.5, window=2, observation_window=2), ids)
    window = model.config.sliding_window
    token = torch.full((1, 1), 9)
    with torch.no_grad():
        for _ in range(12):
            model(input_ids=token, **cache_kwargs(cache))
            for layer in cache.layers:
                if layer.is_sliding:
                    assert layer.store.rows <= window
            assert cache.nbytes() <= cache.full_nbytes() + metadata_nbytes(cache)


def test_padding_queries_of_one_token_forwards_are_finite():
    """Row 0 has no real token yet when a one-token forward brings padding for it."""
    model = tiny_model("llama")
    cache = kvevict.EvictingCache(model, kvevict.make_policy("h2o", compression_ratio=0.5))
    ids = torch.tensor([[0], [5]])
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=torch.tensor([[0], [1]]), **cache_kwargs(cache)).logits
    assert torch.isfinite(logits).all()


def test_reusing_a_cache_for_another_prompt_says_so():
    model = tiny_model("llama")
    cache = kvevict.EvictingCache(model, kvevict.make_policy("full"))
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        model(input_ids=ids, attention_mask=torch.ones_like(ids), **cache_kwargs(cache))
        with pytest.raises(ValueError, match="already holds 4 tokens of another sequence; make a new cache per prompt"):
            model(input_ids=ids, attention_mask=torch.ones_like(ids), **cache_kwargs(cache))


@pytest.mark.parametrize("ratio, seen, kept", [(0.97, 100, 3), (0.7, 10, 3), (0.9, 1000, 100), (0.5, 5, 3)])
def test_targets_are_not_lifted_by_float_noise(ratio, seen, kept):
    cache = kvevict.EvictingCache(tiny_model("llama"), kvevict.make_policy("window", compression_ratio=ratio))
    assert cache.state.target_tokens(torch.tensor([seen])).tolist() == [kept]
