"""The serving engine without HTTP: batched decoding equals decoding alone, admission by KV bytes, preemption."""

import pytest
import torch

pytest.importorskip("prometheus_client")

from kvevict.api import greedy_kwargs, prefill
from kvevict.batch import CacheBatch
from kvevict.cache import EvictingCache
from kvevict.compat import cache_kwargs
from kvevict.models import tiny_model, tiny_tokenizer
from kvevict.policies import make_policy
from kvevict.serve.app import TextTracker
from kvevict.serve.engine import Engine, Request, RequestTooLarge, Sampling
from kvevict.serve.memory import parse_bytes
from kvevict.serve.metrics import Metrics

pytestmark = pytest.mark.filterwarnings("ignore:.*protected tokens.*:UserWarning")


def prompts(lengths, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 250, (n,), generator=g).tolist() for n in lengths]


def alone(model, tok, policy, ids, max_new_tokens):
    """What kvevict.generate does for one prompt of token ids: chunked prefill, then generate()."""
    ids = torch.tensor([ids])
    cache = EvictingCache(model, policy, tokenizer=tok)
    if policy.prefill_chunk and ids.shape[1] > 1:
        prefill(model, cache, ids[:, :-1], torch.ones_like(ids[:, :-1]), policy.prefill_chunk)
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), **cache_kwargs(cache),
                             **greedy_kwargs(tok, max_new_tokens))
    return out[0, ids.shape[1]:].tolist()


def prefilled(model, policy, ids):
    """A cache holding all of `ids` but the last token (the first decode step's input), prefilled in chunks of 8."""
    cache = EvictingCache(model, policy)
    prefill(model, cache, torch.tensor([ids[:-1]]), torch.ones(1, len(ids) - 1, dtype=torch.long), 8)
    return cache


def same_kept(cache, reference):
    assert torch.equal(cache.kept_counts(), reference.kept_counts())
    for layer in range(len(cache.layers)):
        assert [[p.tolist() for p in row] for row in cache.kept_positions(layer)] == \
               [[p.tolist() for p in row] for row in reference.kept_positions(layer)]


def drain(engine, check=None):
    steps = 0
    while engine.waiting or engine.running or engine.prefilling:
        engine.step()
        steps += 1
        if check is not None:
            check(engine)
        assert steps < 10_000
    return steps


@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_cache_batch_rows_decode_as_alone_and_join_and_leave_without_copies(family):
    model = tiny_model(family)
    policy = make_policy("snapkv", compression_ratio=0.5, prefill_chunk=8, decode_interval=3, window=4)

    rows = prompts((30, 17, 44))
    solo = [prefilled(model, policy, ids) for ids in rows]
    together = [prefilled(model, policy, ids) for ids in rows]
    batch = CacheBatch(model, together[:2])
    pending = {i: ids[-1] for i, ids in enumerate(rows)}
    members = [0, 1]
    for step in range(10):
        if step == 4:  # a row joins mid-way, another leaves: the remaining rows' buffers are not copied
            keys_before = together[1].layers[1].store.keys
            batch.remove(together[0])
            members.remove(0)
            batch.add(together[2])
            members.append(2)
            assert together[1].layers[1].store.keys is keys_before
        with torch.no_grad():
            out = model(input_ids=torch.tensor([[pending[i]] for i in members]),
                        position_ids=torch.tensor([[together[i].seen] for i in members]), **cache_kwargs(batch))
            for row, i in enumerate(members):
                ref = model(input_ids=torch.tensor([[pending[i]]]), position_ids=torch.tensor([[solo[i].seen]]),
                            **cache_kwargs(solo[i]))
                torch.testing.assert_close(out.logits[row], ref.logits[0], atol=1e-4, rtol=1e-4)
                pending[i] = int(ref.logits[0, -1].argmax())
        for i in members:
            same_kept(together[i], solo[i])


@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_a_prompt_chunk_rides_a_decode_step_and_everyone_computes_as_alone(family):
    model = tiny_model(family)
    policy = make_policy("snapkv", compression_ratio=0.5, prefill_chunk=8, decode_interval=3, window=4)

    rows = prompts((30, 17))
    newcomer = prompts((29,), seed=2)[0]
    solo = [prefilled(model, policy, ids) for ids in rows]
    together = [prefilled(model, policy, ids) for ids in rows]
    batch = CacheBatch(model, together)
    guest, guest_alone = EvictingCache(model, policy), EvictingCache(model, policy)
    pending = [ids[-1] for ids in rows]
    for start in range(0, 24, 8):  # three prompt chunks of 8, each packed with one decode step of both rows
        chunk = newcomer[start:start + 8]
        with torch.no_grad():
            with guest.prompt(), batch.joining(guest, len(chunk)):  # noqa: SIM117 (the prompt chunk's scope)
                out = model(input_ids=torch.tensor([chunk + pending]),
                            position_ids=torch.tensor([list(range(start, start + 8)) + [c.seen for c in together]]),
                            **cache_kwargs(batch), logits_to_keep=len(together))
            assert out.logits.shape[:2] == (1, 2)
            prefill(model, guest_alone, torch.tensor([newcomer[:start + 8]]), torch.ones(1, start + 8, dtype=torch.long), 8)
            for row in range(2):
                ref = model(input_ids=torch.tensor([[pending[row]]]), position_ids=torch.tensor([[solo[row].seen]]),
                            **cache_kwargs(solo[row]))
                torch.testing.assert_close(out.logits[0, row], ref.logits[0, -1], atol=1e-4, rtol=1e-4)
                pending[row] = int(ref.logits[0, -1].argmax())
        assert guest.seen == guest_alone.seen == start + 8
        same_kept(guest, guest_alone)  # the chunk evicted as its prefill alone does
        for row in range(2):
            same_kept(together[row], solo[row])
    with pytest.raises(ValueError, match="not one of its rows"), batch.joining(together[0], 4):
        pass
    with pytest.raises(ValueError, match="packed step"), torch.no_grad(), guest.prompt(), batch.joining(guest, 4):
        model(input_ids=torch.tensor([[5, 6, 7, 8, 9]]), **cache_kwargs(batch))


def test_cache_batch_refuses_what_it_cannot_run():
    model = tiny_model("llama")
    batch = CacheBatch(model)
    cache = EvictingCache(model, make_policy("window", budget=8))
    batch.add(cache)
    with pytest.raises(ValueError, match="already a row"):
        batch.add(cache)
    with pytest.raises(ValueError, match="model"):
        batch.add(EvictingCache(tiny_model("qwen2")))
    with pytest.raises(ValueError, match="one token per row"):
        model(input_ids=torch.tensor([[5, 6]]), **cache_kwargs(batch))
    batch.remove(cache)
    with pytest.raises(ValueError, match="not a row"):
        batch.remove(cache)


POLICIES = [
    ("full", {}),
    ("snapkv", {"compression_ratio": 0.5, "decode_interval": 4, "window": 4}),
    ("snapkv", {"compression_ratio": 0.6, "allocation": "head", "decode_interval": 5, "window": 4}),
    ("h2o", {"budget": 12, "decode_interval": 2}),
    ("streamingllm", {"compression_ratio": 0.7, "decode_interval": 3}),
    ("ahakv", {"compression_ratio": 0.5, "window": 4}),
    ("knorm", {"compression_ratio": 0.5, "allocation": "global", "decode_interval": 4}),
    ("fastgen", {}),
]


@pytest.mark.parametrize("family", ["llama", "gemma3"])
@pytest.mark.parametrize("name,params", POLICIES, ids=[f"{n}-{i}" for i, (n, _) in enumerate(POLICIES)])
def test_engine_greedy_equals_generate_alone_and_stays_within_prediction(family, name, params):
    model, tok = tiny_model(family), tiny_tokenizer()
    engine = Engine(model, tok, kv_budget=10**9, prefill_chunk=16)
    policy = make_policy(name, **params)
    requests = [Request(ids, 12, policy, Sampling(temperature=0)) for ids in prompts((40, 57, 23, 3, 1, 70))]
    for r in requests:
        engine.submit(r)
    worst = {}

    def check(e):
        for r in e.running + ([e.prefilling] if e.prefilling else []):
            worst[r.id] = max(worst.get(r.id, 0), r.cache.nbytes())

    drain(engine, check)
    for r in requests:
        assert r.finish_reason in ("stop", "length")
        assert r.output_ids == alone(model, tok, r.policy, r.prompt_ids, 12)
        assert worst[r.id] <= r.estimate.peak, (r.id, worst[r.id], r.estimate)
    assert engine.peak_running >= 2


def test_admission_keeps_the_budget_fifo_and_refuses_what_never_fits():
    model, tok = tiny_model("llama"), tiny_tokenizer()
    policy = make_policy("snapkv", compression_ratio=0.5, decode_interval=4)
    probe = Engine(model, tok, kv_budget=10**9, prefill_chunk=16)
    one = probe.estimate(probe.effective_policy(policy), 60, 10)
    budget = 2 * one.peak + one.peak // 2  # room for two requests at their peak, not three
    metrics = Metrics("tiny", budget)
    engine = Engine(model, tok, kv_budget=budget, prefill_chunk=16, metrics=metrics)
    requests = [Request(ids, 10, policy, Sampling(temperature=0)) for ids in prompts((60,) * 5)]
    for r in requests:
        engine.submit(r)
    order, seen_waiting = [], []

    def check(e):
        assert e.nbytes() <= budget
        assert len(e.running) <= 2
        seen_waiting.append(len(e.waiting))
        for r in e.running:
            if r.id not in order:
                order.append(r.id)

    drain(engine, check)
    assert order == [r.id for r in requests]  # first come, first admitted
    assert max(seen_waiting) >= 2 and engine.peak_running == 2
    assert all(r.finish_reason in ("stop", "length") for r in requests)
    text = metrics.render().decode()
    assert 'kvevict:num_requests_running_peak{model_name="tiny"} 2.0' in text
    with pytest.raises(RequestTooLarge, match="budget"):
        engine.submit(Request(prompts((600,))[0], 400, make_policy("full"), Sampling(temperature=0)))


def test_a_request_past_its_prediction_is_preempted_and_recomputed():
    model, tok = tiny_model("llama"), tiny_tokenizer()
    policy = make_policy("full")
    probe = Engine(model, tok, kv_budget=10**9, prefill_chunk=16)
    one = probe.estimate(probe.effective_policy(policy), 50, 20)
    metrics = Metrics("tiny", one.peak + one.peak // 2)
    engine = Engine(model, tok, kv_budget=one.peak + one.peak // 2, prefill_chunk=16, metrics=metrics)
    real_estimate = engine.estimate
    engine.estimate = lambda p, n, g: type(one)(prefill=1, decode=1)  # a prediction far too low: two get in
    requests = [Request(ids, 20, policy, Sampling(temperature=0)) for ids in prompts((50, 50))]
    for r in requests:
        engine.submit(r)
    engine.estimate = real_estimate

    def check(e):
        assert e.nbytes() <= e.kv_budget  # enforced at the end of every step

    drain(engine, check)
    assert sum(r.preemptions for r in requests) >= 1
    assert "kvevict:num_preemptions_total" in metrics.render().decode()
    for r in requests:
        assert r.finish_reason in ("stop", "length") and len(r.output_ids) >= 1


def test_sampling_is_reproducible_with_a_seed_and_stop_frees_the_request():
    model, tok = tiny_model("llama"), tiny_tokenizer()
    engine = Engine(model, tok, kv_budget=10**9, prefill_chunk=16)
    ids = prompts((30,))[0]
    runs = []
    for _ in range(2):
        r = Request(ids, 10, make_policy("full"), Sampling(temperature=0.9, top_p=0.8, seed=7))
        engine.submit(r)
        drain(engine)
        runs.append(r.output_ids)
    assert runs[0] == runs[1]
    r = Request(ids, 50, make_policy("full"), Sampling(temperature=0))
    engine.submit(r)
    for _ in range(5):
        engine.step()
    assert engine.nbytes() > 0
    engine.stop_request(r, "abort")
    engine.step()
    assert r.finish_reason == "abort" and engine.nbytes() == 0 and r.cache is None


def test_text_tracker_holds_back_possible_stop_strings():
    tok = tiny_tokenizer()
    tracker = TextTracker(tok, ["END"])
    out = "".join(tracker.add(i) for i in tok("abc EN").input_ids)
    assert out == "abc "  # "EN" may still become "END"
    out += "".join(tracker.add(i) for i in tok("D more").input_ids)
    assert tracker.stopped and out + tracker.flush() == "abc "


def test_parse_bytes():
    assert parse_bytes("512MiB") == 512 * 2**20
    assert parse_bytes("2GB") == 2 * 10**9
    assert parse_bytes("1.5GiB") == int(1.5 * 2**30)
    assert parse_bytes("123") == 123
    for bad in ("", "12 parsecs", "-5MiB", "0"):
        with pytest.raises(ValueError):
            parse_bytes(bad)


@pytest.mark.parametrize("name", ["fastkvzip", "attention-gate"])
def test_engine_with_trained_gates_equals_generate_alone(name, tmp_path):
    """Trained-gate policies defer a decode step's gates to the end of each row's forward: batched decoding still
    gives what decoding alone gives."""
    from kvevict.gates.attention_gate import GateConfig, build_gates, save_attention_gates

    from .test_fastkvzip import _tiny_gates

    model, tok = tiny_model("llama"), tiny_tokenizer()
    if name == "fastkvzip":
        policy = make_policy(name, gates=str(_tiny_gates(model, tmp_path)), compression_ratio=0.5,
                             decode_interval=4)
    else:
        config = GateConfig(window=8, target_ratio=0.5)
        gates = build_gates(model, config, seed=0)
        with torch.no_grad():
            for gate in gates.values():  # flags that vary from token to token
                gate.out.weight.normal_(0.0, 1.0)
        save_attention_gates(tmp_path, model, gates, config)
        policy = make_policy(name, gates=str(tmp_path), decode_interval=4)
    engine = Engine(model, tok, kv_budget=10**9, prefill_chunk=16)
    requests = [Request(ids, 12, policy, Sampling(temperature=0)) for ids in prompts((40, 57, 23, 3, 70))]
    for r in requests:
        engine.submit(r)
    drain(engine)
    assert engine.peak_running >= 2
    for r in requests:
        assert r.output_ids == alone(model, tok, r.policy, r.prompt_ids, 12)
