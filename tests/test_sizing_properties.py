"""Random trials over policies x sizing x allocation x batches x chunking x decoding on the tiny families, with
the invariants every generation relies on:

- no exception, finite logits at every step (padding positions included);
- every sink and every window token kept, after every forward;
- under uniform allocation, right after an eviction each (layer, row, head) keeps exactly
  min(tokens seen, max(target, protected tokens));
- an evicting cache never holds more bytes than the full cache would (its metadata aside);
- with nothing to evict, the logits equal transformers' DynamicCache (fp32, 1e-4).
"""

import contextlib
import functools

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from transformers import DynamicCache

import kvevict
from kvevict.compat import cache_kwargs
from kvevict.models import tiny_model

FAMILIES = ("llama", "qwen3", "mistral", "gemma3")
# the policies whose selection is the shared one (Policy.select): sizing, protection and allocation apply as is
POLICIES = ("streamingllm", "window", "h2o", "snapkv", "tova", "knorm", "random", "ahakv")
TOL = 1e-4
# trial counts come from the hypothesis profile (tests/conftest.py): `--hypothesis-profile=thorough` runs more
TRIALS = settings(suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


@functools.cache
def model_of(family):
    return tiny_model(family)


@functools.cache
def reference_model_of(family):
    """The same weights on transformers' own SDPA attention."""
    model = tiny_model(family)
    model.set_attn_implementation("sdpa")
    return model


@st.composite
def trials(draw):
    name = draw(st.sampled_from(POLICIES))
    params = dict(
        allocation=draw(st.sampled_from(("uniform", "head", "global"))),
        sink_tokens=draw(st.integers(0, 6)),
        window=draw(st.integers(0, 12)),
        prefill_chunk=draw(st.one_of(st.none(), st.integers(1, 24))),
        decode_interval=draw(st.one_of(st.none(), st.integers(1, 8))),
    )
    if draw(st.booleans()):
        params["compression_ratio"] = draw(st.sampled_from((0.1, 0.3, 0.5, 0.75, 0.9, 0.97)))
    else:
        params["budget"] = draw(st.integers(params["sink_tokens"] + params["window"], 40).filter(lambda b: b >= 1))
    if name == "snapkv":
        params["observation_window"] = draw(st.integers(1, 8))
    lengths = draw(st.lists(st.integers(1, 60), min_size=1, max_size=3))
    return dict(family=draw(st.sampled_from(FAMILIES)), name=name, params=params, lengths=lengths,
                decode_steps=draw(st.integers(0, 10)), seed=draw(st.integers(0, 2**16)))


def left_padded(lengths, seed):
    g = torch.Generator().manual_seed(seed)
    width = max(lengths)
    ids = torch.zeros(len(lengths), width, dtype=torch.long)
    mask = torch.zeros(len(lengths), width, dtype=torch.long)
    for row, n in enumerate(lengths):
        ids[row, width - n:] = torch.randint(3, 300, (n,), generator=g)
        mask[row, width - n:] = 1
    return ids, mask


def forwards(ids, mask, chunk, decode_steps, seed):
    """(input ids, attention mask so far, is a prompt chunk) of every forward: the prompt in chunks, then decoding."""
    chunk = chunk or ids.shape[1]
    for start in range(0, ids.shape[1], chunk):
        stop = min(ids.shape[1], start + chunk)
        yield ids[:, start:stop], mask[:, :stop], True
    g = torch.Generator().manual_seed(seed + 1)
    for _ in range(decode_steps):
        mask = torch.cat([mask, torch.ones(ids.shape[0], 1, dtype=torch.long)], 1)
        yield torch.randint(3, 300, (ids.shape[0], 1), generator=g), mask, False


def protected_count(cache, target, seen):
    """How many of a row's `seen` real tokens are protected when keeping `target`: sinks and recent window."""
    state = cache.state
    return min(seen, state.protected_prefix() + state.recent_window(target, cache.eviction_context()))


def check_protected_kept(cache, policy):
    """Every sink and every window token of each row is still held by every evictable layer and head (tokens
    that arrived after the last eviction are all held, so this holds after every forward)."""
    seen = cache.tokens_seen.tolist()
    for layer in cache.layers:
        if layer.is_sliding or layer.store is None:
            continue
        for row, heads in enumerate(cache.kept_positions(layer.layer_idx)):
            protected = set(range(min(seen[row], cache.state.protected_prefix())))
            protected |= set(range(max(0, seen[row] - policy.window), seen[row]))
            for kept in heads:
                missing = protected - set(kept.tolist())
                assert not missing, f"layer {layer.layer_idx} row {row}: protected positions {sorted(missing)} evicted"


@pytest.mark.filterwarnings("ignore:.*protected tokens.*exceed the target")
@TRIALS
@given(trials())
def test_sizing_invariants(trial):
    model = model_of(trial["family"])
    policy = kvevict.make_policy(trial["name"], **trial["params"])
    ids, mask = left_padded(trial["lengths"], trial["seed"])
    cache = kvevict.EvictingCache(model, policy)
    decode_steps_since_eviction = 0
    with torch.no_grad():
        for step_ids, step_mask, is_prompt in forwards(ids, mask, policy.prefill_chunk, trial["decode_steps"],
                                                       trial["seed"]):
            with cache.prompt() if is_prompt else contextlib.nullcontext():
                logits = model(input_ids=step_ids, attention_mask=step_mask, **cache_kwargs(cache)).logits
            assert torch.isfinite(logits).all()
            decode_steps_since_eviction = 0 if is_prompt else decode_steps_since_eviction + 1
            evicted = is_prompt or decode_steps_since_eviction == policy.decode_interval
            if evicted:
                decode_steps_since_eviction = 0
            check_protected_kept(cache, policy)
            metadata = sum(layer.store.metadata_nbytes() for layer in cache.layers if layer.store is not None)
            assert cache.nbytes() <= cache.full_nbytes() + metadata
            if evicted and policy.allocation == "uniform":
                seen = cache.tokens_seen
                targets = cache.state.target_tokens(seen)
                counts = cache.kept_counts()
                for row in range(len(seen)):
                    target, real = int(targets[row]), int(seen[row])
                    want = min(real, max(target, protected_count(cache, target, real)))
                    for layer in cache.layers:
                        if not layer.is_sliding:
                            assert counts[layer.layer_idx, row].eq(want).all(), (
                                f"layer {layer.layer_idx} row {row}: kept {counts[layer.layer_idx, row].tolist()}, "
                                f"want {want} (target {target}, {real} tokens seen)")


@TRIALS
@given(family=st.sampled_from(FAMILIES), name=st.sampled_from(POLICIES + ("full",)),
       lengths=st.lists(st.integers(1, 40), min_size=1, max_size=3), chunk=st.one_of(st.none(), st.integers(1, 16)),
       decode_steps=st.integers(0, 6), seed=st.integers(0, 2**16))
def test_ratio_zero_equals_dynamic_cache(family, name, lengths, chunk, decode_steps, seed):
    model = model_of(family)
    ids, mask = left_padded(lengths, seed)
    cache = kvevict.EvictingCache(model, kvevict.make_policy(name, compression_ratio=0.0))
    reference = DynamicCache(config=model.config)
    with torch.no_grad():
        for step_ids, step_mask, _ in forwards(ids, mask, chunk, decode_steps, seed):
            positions = (step_mask.cumsum(-1) - 1).clamp(min=0)[:, -step_ids.shape[1]:]
            got = model(input_ids=step_ids, attention_mask=step_mask, position_ids=positions,
                        **cache_kwargs(cache)).logits
            want = reference_model_of(family)(input_ids=step_ids, attention_mask=step_mask, position_ids=positions,
                                              **cache_kwargs(reference)).logits
            assert torch.isfinite(got).all()
            real = step_mask[:, -step_ids.shape[1]:].bool()
            assert (got[real] - want[real]).abs().max() <= TOL
