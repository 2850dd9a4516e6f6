"""One policy configuration serves many caches (in a row, from threads); each cache keeps its own state, and
observers sharing one prefill never share a side channel."""

import threading

import pytest
import torch

import kvevict
from kvevict.api import prefill
from kvevict.compat import cache_kwargs
from kvevict.models import tiny_model, tiny_tokenizer
from kvevict.policies.base import ObserverSet

from .conftest import left_padded_batch
from .test_fastkvzip import _tiny_gates

TEXT = "The cat, the dog and the bird. A quick brown fox jumps over the lazy dog; then it sleeps! " * 4


def kept_sets(cache):
    return [[kept.tolist() for kept in row] for layer in range(len(cache.layers)) for row in cache.kept_positions(layer)]


def run(model, policy, ids, mask):
    cache = kvevict.EvictingCache(model, policy)
    with torch.no_grad():
        model(input_ids=ids, attention_mask=mask, **cache_kwargs(cache))
        token = torch.full((ids.shape[0], 1), 7)
        for _ in range(6):
            mask = torch.cat([mask, torch.ones_like(token)], 1)
            model(input_ids=token, attention_mask=mask, **cache_kwargs(cache))
    return kept_sets(cache)


def test_one_policy_for_many_caches_in_a_row_and_from_threads():
    model = tiny_model("llama")
    batches = [left_padded_batch((90, 70), seed=seed) for seed in range(4)]
    params = dict(compression_ratio=0.75, window=8, observation_window=8, decode_interval=3)
    fresh = [run(model, kvevict.make_policy("snapkv", **params), *batch) for batch in batches]
    shared = kvevict.make_policy("snapkv", **params)
    assert [run(model, shared, *batch) for batch in batches] == fresh
    results = [None] * 4

    def worker(i):
        results[i] = run(model, shared, *batches[i])

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert results == fresh


def test_a_policy_is_frozen():
    policy = kvevict.make_policy("snapkv", compression_ratio=0.5)
    with pytest.raises(AttributeError):
        policy.compression_ratio = 0.9


def forked_as_alone(model, variants, prompt_ids, tokenizer=None):
    """Each variant's kept sets when forked from one shared prefill, and when run alone."""
    observed = kvevict.EvictingCache(model, ObserverSet(variants), tokenizer=tokenizer)
    prefill(model, observed, prompt_ids, torch.ones_like(prompt_ids), None)
    for variant in variants:
        fork = observed.fork(variant)
        fork.evict()
        alone = kvevict.EvictingCache(model, variant, tokenizer=tokenizer)
        prefill(model, alone, prompt_ids, torch.ones_like(prompt_ids), None)
        yield kept_sets(fork), kept_sets(alone)


def test_two_fastgen_variants_observing_one_prefill_evict_as_each_alone():
    model, tok = tiny_model("llama"), tiny_tokenizer()
    ids = tok(TEXT, return_tensors="pt").input_ids
    variants = [kvevict.make_policy("fastgen", recovery=0.9), kvevict.make_policy("fastgen", recovery=0.9,
                                                                                   profile_window=8)]
    results = list(forked_as_alone(model, variants, ids, tok))
    assert results[0][1] != results[1][1]  # the two variants keep different tokens ...
    for fork, alone in results:  # ... and each fork keeps what its variant keeps alone
        assert fork == alone


def test_two_fastkvzip_gate_folders_observing_one_prefill_evict_as_each_alone(tmp_path):
    model = tiny_model("llama")
    first = _tiny_gates(model, tmp_path / "a", target=0.5, seed=1)
    second = _tiny_gates(model, tmp_path / "b", target=0.5, seed=2)
    ids = torch.randint(3, 300, (1, 120), generator=torch.Generator().manual_seed(2))
    variants = [kvevict.make_policy("fastkvzip", gates=str(first), window=4),
                kvevict.make_policy("fastkvzip", gates=str(second), window=4)]
    results = list(forked_as_alone(model, variants, ids))
    assert results[0][1] != results[1][1]
    for fork, alone in results:
        assert fork == alone


def test_the_model_stays_its_owners():
    model, tok = tiny_model("llama"), tiny_tokenizer()
    model.set_attn_implementation("eager")
    tok.padding_side = "right"
    cache = kvevict.EvictingCache(model, kvevict.make_policy("h2o", compression_ratio=0.5))
    assert model.config._attn_implementation == "eager"
    ids, mask = left_padded_batch((30, 20))
    with torch.no_grad():
        model(input_ids=ids, attention_mask=mask, **cache_kwargs(cache))
    assert model.config._attn_implementation == "eager"  # switched for the cache's forwards only
    assert cache.kept_counts().eq(torch.tensor([15, 10]).view(1, 2, 1)).all()  # ... and observed there
    kvevict.generate(model, tok, ["hello there", "hi"], policy=kvevict.make_policy("h2o", compression_ratio=0.5),
                     max_new_tokens=3)
    assert tok.padding_side == "right"
    assert model.config._attn_implementation == "eager"


def test_decoding_buffers_exactly_the_last_window_of_queries():
    """SnapKV's recent queries while decoding: one chunk per token, never more than the window needs, and what
    it returns is the last `query_window` queries the layer saw (the same as a fresh attention call would)."""
    model = tiny_model("llama")
    window = 6
    policy = kvevict.make_policy("snapkv", compression_ratio=0.5, observation_window=window, decode_interval=100)
    cache = kvevict.EvictingCache(model, policy)
    ids = torch.randint(3, 200, (1, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out = model(input_ids=ids, **cache_kwargs(cache))
        for _ in range(15):
            out = model(input_ids=out.logits[:, -1:].argmax(-1), **cache_kwargs(cache))
    state, seen = cache.state, cache.seen
    for layer in (i for i, item in enumerate(cache.layers) if item.evictable):
        chunks = state.queries[layer]
        assert len(chunks) == window  # one per decoded token: older ones were dropped as they arrived
        assert sum(c[1].numel() for c in chunks) == window
        queries, positions, valid = state.recent_queries(layer)
        assert positions.tolist() == list(range(seen - window, seen))
        assert queries.shape[-2] == window and bool(valid.all())
        assert len(state.queries[layer]) == 1  # joined once, and the count follows the join
        out = model(input_ids=out.logits[:, -1:].argmax(-1), **cache_kwargs(cache))
        assert state.recent_queries(layer)[1].tolist() == list(range(seen - window + 1, seen + 1))
        seen += 1
