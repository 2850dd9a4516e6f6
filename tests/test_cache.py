"""Storage, memory accounting, decoding-time eviction, batches, chunked prefill and freezing."""

import math

import pytest
import torch

import kvevict
from kvevict.api import prefill
from kvevict.compat import cache_kwargs
from kvevict.models import tiny_model
from kvevict.storage import LayerStore

from .conftest import left_padded_batch


def test_store_append_compact_truncate_roundtrip():
    store = LayerStore(batch=2, heads=3, head_dim=4, dtype=torch.float32, device=torch.device("cpu"))
    keys = torch.randn(2, 3, 5, 4)
    valid = torch.tensor([[True] * 5, [False, False, True, True, True]])
    store.append(keys, -keys, torch.arange(5), valid, slack=0)
    view = store.view()
    assert store.kept_counts().tolist() == [[5, 5, 5], [3, 3, 3]]
    assert torch.equal(view.keys[0], keys[0]) and torch.equal(view.keys[1, :, :3], keys[1, :, 2:])
    assert view.positions[1, 0].tolist() == [2, 3, 4, -1, -1]
    keep = torch.zeros_like(view.valid)
    keep[0, 0, [1, 3]] = True
    keep[0, 2, :] = True
    keep[1, 1, 0] = True
    store.compact(keep, view, slack=2)
    assert store.kept_counts().tolist() == [[2, 0, 5], [0, 1, 0]]
    assert store.rows == 2 + 0 + 5 + 0 + 1 + 0 + 6 * 2  # each segment: what it keeps + slack
    view = store.view()
    assert torch.equal(view.keys[0, 0, :2], keys[0, 0, [1, 3]])
    assert torch.equal(view.values[1, 1, :1], -keys[1, 1, 2:3])
    before = store.seg_len.clone()
    store.append(keys[:, :, :1], keys[:, :, :1], torch.tensor([5]), torch.ones(2, 1, dtype=torch.bool), slack=0)
    assert (store.seg_len == before + 1).all()
    store.truncate(before)
    assert store.kept_counts().tolist() == [[2, 0, 5], [0, 1, 0]]
    assert (store.view().positions[0, 0] == torch.tensor([1, 3, -1, -1, -1], dtype=torch.int32)).all()


def test_store_frees_memory_per_head():
    store = LayerStore(batch=1, heads=4, head_dim=8, dtype=torch.float32, device=torch.device("cpu"))
    store.append(torch.randn(1, 4, 100, 8), torch.randn(1, 4, 100, 8), torch.arange(100),
                 torch.ones(1, 100, dtype=torch.bool), slack=0)
    view = store.view()
    keep = torch.zeros_like(view.valid)
    keep[0, 0, :90] = True  # heads keep 90, 10, 0, 0 tokens: 100 rows in all, not 4 x 90
    keep[0, 1, :10] = True
    store.compact(keep, view)
    assert store.rows == 100
    assert store.nbytes() == (100 + 1) * (2 * 8 * 4 + 4)  # + the sentinel row empty slots point at


@pytest.mark.parametrize("allocation", ["uniform", "head", "global"])
def test_nbytes_at_075_is_at_most_027_of_full(allocation):
    model = tiny_model("llama")
    ids, mask = left_padded_batch((400, 333))
    policy = kvevict.make_policy("snapkv", compression_ratio=0.75, allocation=allocation)
    cache = kvevict.EvictingCache(model, policy)
    with torch.no_grad():
        model(input_ids=ids, attention_mask=mask, **cache_kwargs(cache))
    assert cache.nbytes() <= 0.27 * cache.full_nbytes()
    kept = cache.kept_counts().sum(dim=(0, 2))  # per batch row
    heads = model.config.num_hidden_layers * model.config.num_key_value_heads
    assert kept.tolist() == [math.ceil(0.25 * 400) * heads, math.ceil(0.25 * 333) * heads]


def test_decoding_keeps_a_fixed_budget():
    model = tiny_model("mistral")
    ids, mask = left_padded_batch((40,))
    policy = kvevict.make_policy("h2o", budget=16, decode_interval=4)
    cache = kvevict.EvictingCache(model, policy)
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, **cache_kwargs(cache))
        assert cache.kept_counts().max() == 16
        token = out.logits[:, -1:].argmax(-1)
        for step in range(1, 21):
            mask = torch.cat([mask, torch.ones_like(token)], 1)
            out = model(input_ids=token, attention_mask=mask, **cache_kwargs(cache))
            token = out.logits[:, -1:].argmax(-1)
            counts = cache.kept_counts()
            assert counts.max() == 16 + step % 4  # grows between evictions, back to the budget at each
    assert cache.seen == 60 and cache.get_seq_length() == 60
    latest = cache.kept_positions(0)[0][0]
    assert int(latest.max()) == 59  # new tokens enter at their true position


def test_decoding_eviction_with_ratio_tracks_tokens_seen():
    model = tiny_model("llama")
    ids, mask = left_padded_batch((64,))
    policy = kvevict.make_policy("snapkv", compression_ratio=0.5, decode_interval=8, window=4, observation_window=4)
    texts_cache = kvevict.EvictingCache(model, policy)
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, **cache_kwargs(texts_cache))
        token = out.logits[:, -1:].argmax(-1)
        for _ in range(16):
            mask = torch.cat([mask, torch.ones_like(token)], 1)
            token = model(input_ids=token, attention_mask=mask, **cache_kwargs(texts_cache)).logits[:, -1:].argmax(-1)
    assert texts_cache.kept_counts().max() == math.ceil(0.5 * 80)


# knorm is left out: a repeated token has the same key norm at every position (RoPE preserves norms), so its
# ranking is decided by rounding noise, which differs between batched and single-row matmuls.
@pytest.mark.parametrize("name", ["snapkv", "h2o", "tova", "streamingllm", "random"])
def test_batch_equals_each_prompt_alone(tok, name):
    model = tiny_model("qwen3")
    prompts = ["the quick brown fox jumps over the lazy dog " * 3, "a short one, but not too short"]
    policy = lambda: kvevict.make_policy(name, compression_ratio=0.5, decode_interval=5, window=4)  # noqa: E731
    together = kvevict.generate(model, tok, prompts, policy=policy(), max_new_tokens=12)
    alone = [kvevict.generate(model, tok, [p], policy=policy(), max_new_tokens=12)[0] for p in prompts]
    assert together == alone
    assert all(len(text.strip()) > 0 for text in together)  # the model says something, so equality means something


def test_chunked_prefill_bounds_memory_and_matches_full_policy(tok):
    model = tiny_model("llama")
    prompt = "tokens flow through chunks " * 8
    plain = kvevict.generate(model, tok, [prompt], policy=kvevict.make_policy("full"), max_new_tokens=10)
    chunked = kvevict.generate(model, tok, [prompt], policy=kvevict.make_policy("full", prefill_chunk=16),
                               max_new_tokens=10)
    assert plain == chunked
    ids, mask = left_padded_batch((200,))
    cache = kvevict.EvictingCache(model, kvevict.make_policy("knorm", budget=20))
    peak = 0
    for stop in range(40, 201, 40):
        prefill(model, cache, ids[:, :stop], mask[:, :stop], chunk=40)
        peak = max(peak, int(cache.kept_counts().max()))
    assert int(cache.kept_counts().max()) == 20 and cache.seen == 200


def test_answer_compresses_once_and_restores_between_questions(tok):
    model = tiny_model("llama")
    context = "alpha beta gamma delta " * 10
    policy = kvevict.make_policy("snapkv", compression_ratio=0.5, window=4, observation_window=4)
    answers, cache = kvevict.answer(model, tok, context, ["first?", "second one?"], policy=policy,
                                    max_new_tokens=5, return_cache=True)
    assert len(answers) == 2
    counts, nbytes, seen = cache.kept_counts(), cache.nbytes(), cache.seen
    # asking again leaves the compressed context exactly as it was
    with cache.frozen_tokens():
        ids = torch.randint(3, 300, (1, seen + 7))
        model(input_ids=ids[:, seen:], attention_mask=torch.ones_like(ids), **cache_kwargs(cache))
        assert cache.seen == seen + 7
    assert torch.equal(cache.kept_counts(), counts) and cache.seen == seen
    assert cache.nbytes() >= nbytes - 1 and cache.compression() > 0.45
    # the answers depend only on the compressed context: same question, same answer
    again = kvevict.answer(model, tok, context, ["second one?"], policy=kvevict.make_policy(
        "snapkv", compression_ratio=0.5, window=4, observation_window=4), max_new_tokens=5)
    assert again[0] == answers[1]


def test_fork_sizes_one_observed_prefill_like_separate_runs():
    from kvevict.policies.base import ObserverSet

    model = tiny_model("llama")
    ids, mask = left_padded_batch((60, 45))
    names = ["snapkv", "h2o", "tova", "knorm"]
    observed = kvevict.EvictingCache(model, ObserverSet([kvevict.make_policy(n) for n in names]))
    with torch.no_grad():
        model(input_ids=ids, attention_mask=mask, **cache_kwargs(observed))
    for name in names:
        for ratio in (0.5, 0.75):
            fork = observed.fork(kvevict.make_policy(name, compression_ratio=ratio))
            fork.evict()
            direct = kvevict.EvictingCache(model, kvevict.make_policy(name, compression_ratio=ratio))
            with torch.no_grad():
                model(input_ids=ids, attention_mask=mask, **cache_kwargs(direct))
            for layer in range(model.config.num_hidden_layers):
                for row_f, row_d in zip(fork.kept_positions(layer), direct.kept_positions(layer)):
                    assert all(torch.equal(a, b) for a, b in zip(row_f, row_d))
    assert int(observed.kept_counts().min()) == 45  # the observed cache itself evicted nothing


def test_stacked_caches_answer_like_each_cache_alone():
    model = tiny_model("llama")
    ids, mask = left_padded_batch((50,), seed=4)
    caches = []
    for name, ratio in [("snapkv", 0.5), ("knorm", 0.75), ("full", 0.0)]:
        cache = kvevict.EvictingCache(model, kvevict.make_policy(name, compression_ratio=ratio))
        with torch.no_grad():
            model(input_ids=ids, attention_mask=mask, **cache_kwargs(cache))
        caches.append(cache)
    question = torch.randint(3, 300, (1, 5))
    alone = []
    for cache in caches:
        with cache.frozen_tokens(), torch.no_grad():
            alone.append(model(input_ids=question, attention_mask=torch.ones(1, 55, dtype=torch.long),
                               **cache_kwargs(cache)).logits[0])
    stacked = kvevict.EvictingCache.stack(caches)
    assert torch.equal(stacked.kept_counts()[:, 1], caches[1].kept_counts()[:, 0])
    with stacked.frozen_tokens(), torch.no_grad():
        together = model(input_ids=question.expand(3, -1), attention_mask=torch.ones(3, 55, dtype=torch.long),
                         **cache_kwargs(stacked)).logits
    for row in range(3):
        assert (together[row] - alone[row]).abs().max() <= 1e-4


def test_a_stacked_cache_decodes_in_place_and_gives_its_room_back():
    """A stacked cache has no policy: decoding inside frozen_tokens still grows its segments with room to spare
    (not one relayout, a copy of the layer, per token), and the room goes on exit."""
    model = tiny_model("llama")
    ids, mask = left_padded_batch((40,), seed=5)
    caches = []
    for name in ("snapkv", "knorm"):
        cache = kvevict.EvictingCache(model, kvevict.make_policy(name, compression_ratio=0.5))
        with torch.no_grad():
            model(input_ids=ids, attention_mask=mask, **cache_kwargs(cache))
        caches.append(cache)
    stacked = kvevict.EvictingCache.stack(caches)
    before = stacked.nbytes()
    token = torch.full((2, 1), 7)
    with stacked.frozen_tokens(), torch.no_grad():
        seen = stacked.seen
        model(input_ids=token, attention_mask=torch.ones(2, seen + 1, dtype=torch.long), **cache_kwargs(stacked))
        buffers = [layer.store.keys.data_ptr() for layer in stacked.layers]
        for step in range(2, 12):
            model(input_ids=token, attention_mask=torch.ones(2, seen + step, dtype=torch.long),
                  **cache_kwargs(stacked))
            assert [layer.store.keys.data_ptr() for layer in stacked.layers] == buffers  # appended in place
    assert stacked.nbytes() == before


def test_frozen_tokens_leave_sliding_layers_untouched(tok):
    model = tiny_model("gemma3")  # sliding window of 8 tokens on alternate layers
    context = "a context long enough to fill the sliding window several times over. " * 2
    policy = kvevict.make_policy("snapkv", compression_ratio=0.5, window=4, observation_window=4)
    answers, cache = kvevict.answer(model, tok, context, ["a question far longer than the sliding window " * 2],
                                    policy=policy, max_new_tokens=40, return_cache=True)
    before = [layer.store.view().positions.clone() for layer in cache.layers]
    kvevict_answers = kvevict.answer(model, tok, context, ["a question far longer than the sliding window " * 2],
                                     policy=kvevict.make_policy("snapkv", compression_ratio=0.5, window=4,
                                                                observation_window=4), max_new_tokens=40)
    assert kvevict_answers == answers
    with cache.frozen_tokens():
        ids = torch.randint(3, 300, (1, cache.seen + 50))
        model(input_ids=ids[:, cache.seen:], attention_mask=torch.ones_like(ids), **cache_kwargs(cache))
    after = [layer.store.view().positions for layer in cache.layers]
    assert all(torch.equal(a, b) for a, b in zip(before, after))
