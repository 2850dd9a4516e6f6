"""AhaKV: the Step Gain scale, scores against an eager reference (each part switched on and off), the value prior,
the fixed budget while decoding, shared observations for ablations, the profile report and bad parameters."""

import math

import pytest
import torch
import torch.nn.functional as F
from transformers import DynamicCache

import kvevict
from kvevict.compat import cache_kwargs
from kvevict.contexts import LayerContext
from kvevict.models import tiny_model, tiny_tokenizer
from kvevict.policies.ahakv import AhaKVPolicy, step_gain_lambda, value_prior_weights
from kvevict.policies.base import ObserverSet
from kvevict.profiling import ahakv_profile

from .conftest import left_padded_batch

PROMPT, R = 48, 8


@pytest.fixture(scope="module")
def setup():
    """A 2-layer tiny Llama (4 query heads, 2 KV heads: G = 2), a prompt, and its eager reference:
    attention maps [layer][Hq, T, T] and values [layer][H, T, d]."""
    model = tiny_model("llama", num_hidden_layers=2)
    ids, _ = left_padded_batch((PROMPT,), seed=3)
    model.set_attn_implementation("eager")
    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        out = model(input_ids=ids, **cache_kwargs(cache), output_attentions=True)
    attn = [a[0] for a in out.attentions]
    values = [layer.values[0] for layer in cache.layers]
    return model, ids, attn, values


def ahakv(**params):
    params = {"recent_rows": R, "decode_interval": None, **params}
    return AhaKVPolicy(**params)


def scores_before_eviction(model, ids, policy):
    """The policy's scores of the whole prompt per layer [H, T], from an observed prefill forked to the policy."""
    observer = ObserverSet([AhaKVPolicy(**policy.params())])  # observes without evicting
    observed = kvevict.EvictingCache(model, observer)
    with torch.no_grad():
        model(input_ids=ids, **cache_kwargs(observed))
    fork = observed.fork(policy)
    out = {}
    for layer in fork.layers:
        ctx = LayerContext(layer.layer_idx, layer.store.view(), layer.store, layer.scaling, row_start=fork.row_start,
                           tokens_seen=fork.tokens_seen, seen=fork.seen)
        out[layer.layer_idx] = fork.state.score(layer.layer_idx, ctx)[0]
    return out


def group(x, model):
    """[Hq, ...] -> [H, G, ...]."""
    H = model.config.num_key_value_heads
    return x.view(H, -1, *x.shape[1:])


def reference_gamma(values, kernel):
    energy = values.pow(2).sum(-1)  # [H, T]
    pooled = F.avg_pool1d(energy[:, None], kernel, 1, kernel // 2, count_include_pad=False)[:, 0]
    return pooled / pooled.amax(-1, keepdim=True)


# ---------------------------------------------------------------------------------------------- step gain
def test_step_gain_lambda_matches_formula():
    assert step_gain_lambda(4000, 1000, 64) == pytest.approx(math.sqrt(2 * math.log(4) / 64), rel=1e-12)
    assert step_gain_lambda(1001, 1000, 128) == pytest.approx(math.sqrt(2 * math.log(1.001) / 128), rel=1e-12)
    n = torch.tensor([2000, 8000, 32000])
    got = step_gain_lambda(n, 1000, 64)
    assert torch.allclose(got, torch.sqrt(2 * torch.log(n.double() / 1000) / 64))
    with pytest.raises(ValueError, match="n > k"):
        step_gain_lambda(1000, 1000, 64)
    with pytest.raises(ValueError, match="n > k"):
        step_gain_lambda(torch.tensor([2000, 500]), 1000, 64)
    with pytest.raises(ValueError, match="head dimension"):
        step_gain_lambda(4000, 1000, 0)


def test_step_gain_sets_the_expected_attention_entropy_to_log_budget():
    # the derivation: with q, k ~ N(0, I_d), logits lambda q.k ~ N(0, lambda^2 d) and the softmax entropy is
    # about ln n - lambda^2 d / 2 = ln k; the plain 1/sqrt(d) scale leaves it near ln n - 1/2
    g = torch.Generator().manual_seed(0)
    n, k, d = 50_000, 2_000, 64
    q, keys = torch.randn(8, d, generator=g, dtype=torch.float64), torch.randn(n, d, generator=g, dtype=torch.float64)

    def entropy(scale):
        p = torch.softmax(q @ keys.T * scale, -1)
        return float(-(p * p.log()).sum(-1).mean())

    assert entropy(step_gain_lambda(n, k, d)) == pytest.approx(math.log(k), abs=0.2)
    assert entropy(d**-0.5) == pytest.approx(math.log(n) - 0.5, abs=0.1)


def test_step_gain_scores_equal_reference_attention_at_lambda(setup):
    model, ids, attn, _ = setup
    budget = 20
    policy = ahakv(budget=budget, value_prior=False)
    scores = scores_before_eviction(model, ids, policy)
    d = model.config.head_dim
    # eager probs p = softmax(c q.k); softmax(lambda q.k) = softmax((lambda / c) ln p) over the same keys
    ratio = step_gain_lambda(PROMPT, budget, d) / d**-0.5
    assert ratio > 1  # n / k = 2.4: sharper than the plain softmax
    for layer in range(2):
        sharpened = torch.softmax(ratio * attn[layer][:, -R:, :].log(), dim=-1)
        expected = group(sharpened.sum(1), model).mean(1)
        assert torch.allclose(scores[layer], expected, atol=1e-5)
        plain = group(attn[layer][:, -R:, :].sum(1), model).mean(1)
        assert not torch.allclose(scores[layer], plain, atol=1e-3)


# ---------------------------------------------------------------------------------------------- scores
@pytest.mark.parametrize("reduction", ["mean", "max"])
def test_without_sg_and_vpe_scores_are_last_r_rows_accumulated_attention(setup, reduction):
    model, ids, attn, _ = setup
    policy = ahakv(budget=20, step_gain=False, value_prior=False, group_reduction=reduction)
    scores = scores_before_eviction(model, ids, policy)
    for layer in range(2):
        per_head = group(attn[layer][:, -R:, :].sum(1), model)  # [H, G, T]: sum over the last r query rows
        expected = per_head.mean(1) if reduction == "mean" else per_head.amax(1)
        assert torch.allclose(scores[layer], expected, atol=1e-5)


@pytest.mark.parametrize("step_gain", [False, True])
def test_without_recent_accumulation_scores_accumulate_every_query_row(setup, step_gain):
    model, ids, attn, _ = setup
    budget = 20
    policy = ahakv(budget=budget, recent_accumulation=False, step_gain=step_gain, value_prior=False)
    scores = scores_before_eviction(model, ids, policy)
    ratio = step_gain_lambda(PROMPT, budget, model.config.head_dim) / model.config.head_dim**-0.5 if step_gain else 1.0
    for layer in range(2):
        probs = torch.softmax(ratio * attn[layer].log(), -1)  # = attn itself when SG is off
        expected = group(probs.sum(1), model).mean(1)  # every query row; with SG off (all three parts off): H2O's score
        assert torch.allclose(scores[layer], expected, atol=1e-5)


def test_value_prior_multiplies_as_defined(setup):
    model, ids, _, values = setup
    kernel = 5
    with_prior = scores_before_eviction(model, ids, ahakv(budget=20, pool_kernel=kernel))
    without = scores_before_eviction(model, ids, ahakv(budget=20, value_prior=False))
    for layer in range(2):
        gamma_bar = reference_gamma(values[layer], kernel)
        assert torch.allclose(with_prior[layer], without[layer] * gamma_bar, atol=1e-6)
        assert float(gamma_bar.amax()) == pytest.approx(1.0)


def test_value_prior_ignores_empty_slots():
    g = torch.Generator().manual_seed(1)
    values = torch.randn(1, 2, 12, 4, generator=g)
    valid = torch.ones(1, 2, 12, dtype=torch.bool)
    valid[0, 1, 9:] = False  # head 1 keeps 9 tokens; its last 3 slots are empty (and hold garbage here)
    got = value_prior_weights(values, valid, kernel=5)
    assert torch.allclose(got[0, 0], reference_gamma(values[0, 0:1], 5)[0], atol=1e-6)
    assert torch.allclose(got[0, 1, :9], reference_gamma(values[0, 1:2, :9], 5)[0], atol=1e-6)
    assert torch.equal(got[0, 1, 9:], torch.zeros(3))
    assert torch.allclose(value_prior_weights(values, valid, kernel=1)[0, 0], values[0, 0].pow(2).sum(-1) /
                          values[0, 0].pow(2).sum(-1).max())


def test_prefill_keeps_top_scores_plus_r_most_recent(setup):
    model, ids, attn, values = setup
    budget = 20
    cache = kvevict.EvictingCache(model, ahakv(budget=budget))
    with torch.no_grad():
        model(input_ids=ids, **cache_kwargs(cache))
    ratio = step_gain_lambda(PROMPT, budget, model.config.head_dim) / model.config.head_dim**-0.5
    for layer in range(2):
        s = group(torch.softmax(ratio * attn[layer][:, -R:, :].log(), -1).sum(1), model).mean(1)
        s = s * reference_gamma(values[layer], 5)
        s[:, PROMPT - R:] = float("inf")  # the r most recent are always kept
        expected = [set(row.topk(budget).indices.tolist()) for row in s]
        assert [set(p.tolist()) for p in cache.kept_positions(layer)[0]] == expected


# ---------------------------------------------------------------------------------------------- decoding, batches
@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_decoding_keeps_the_budget_fixed_and_scores_with_recent_queries(family):
    model = tiny_model(family)
    ids, mask = left_padded_batch((40, 33), seed=2)
    budget = 16
    policy = kvevict.make_policy("ahakv", budget=budget, recent_rows=R)
    assert policy.decode_interval == 1
    cache = kvevict.EvictingCache(model, policy)
    evictable = [layer.layer_idx for layer in cache.layers if layer.evictable]
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, **cache_kwargs(cache))
        for step in range(12):
            counts = torch.stack([cache.layers[i].store.kept_counts() for i in evictable])
            assert bool((counts == budget).all())  # every head of every evictable layer, every step
            token = out.logits[:, -1:].argmax(-1)
            mask = torch.cat([mask, torch.ones_like(token)], 1)
            out = model(input_ids=token, attention_mask=mask, **cache_kwargs(cache))
    seen = cache.seen
    for i in evictable:
        _, query_positions, _ = cache.state.recent_queries(i)
        assert query_positions.tolist() == list(range(seen - R, seen))  # decoded queries drive the scores
        for b, row in enumerate(cache.kept_positions(i)):
            end = seen - int(cache.row_start[b])  # relative position of the next token
            for head in row:
                assert set(range(end - R, end)) <= set(head.tolist())  # the r most recent are kept
                assert int(head.min()) < end - budget  # and older tokens by score, not just a window


def test_batch_equals_each_prompt_alone():
    model, tok = tiny_model("qwen3"), tiny_tokenizer()
    prompts = ["the quick brown fox jumps over the lazy dog " * 3, "a short one, but not too short"]
    policy = lambda: kvevict.make_policy("ahakv", compression_ratio=0.5, recent_rows=4, decode_interval=3)  # noqa: E731
    together, cache = kvevict.generate(model, tok, prompts, policy=policy(), max_new_tokens=10, return_cache=True)
    alone = [kvevict.generate(model, tok, [p], policy=policy(), max_new_tokens=10)[0] for p in prompts]
    assert together == alone
    assert all(text.strip() for text in together)
    assert cache.compression() > 0.3


# ---------------------------------------------------------------------------------------------- shared observations
def test_ablations_observed_together_evict_like_separate_runs():
    model = tiny_model("llama")
    ids, mask = left_padded_batch((60, 45), seed=4)
    variants = [dict(), dict(step_gain=False), dict(value_prior=False), dict(recent_accumulation=False),
                dict(recent_accumulation=False, step_gain=False), dict(recent_accumulation=False, budget=30)]
    make = lambda v: ahakv(**{"budget": 20, **v})  # noqa: E731
    observer = ObserverSet([make(v) for v in variants])
    assert len(observer.members) == 4  # SG and VPE on/off share the RA observation; RA-off with SG depends on k
    observed = kvevict.EvictingCache(model, observer)
    with torch.no_grad():
        model(input_ids=ids, attention_mask=mask, **cache_kwargs(observed))
    for v in variants:
        fork = observed.fork(make(v))
        fork.evict()
        direct = kvevict.EvictingCache(model, make(v))
        with torch.no_grad():
            model(input_ids=ids, attention_mask=mask, **cache_kwargs(direct))
        for layer in range(model.config.num_hidden_layers):
            for row_f, row_d in zip(fork.kept_positions(layer), direct.kept_positions(layer)):
                assert all(torch.equal(a, b) for a, b in zip(row_f, row_d)), v


def test_profile_reports_positions_and_draws_histograms(tmp_path):
    model, tok = tiny_model("llama"), tiny_tokenizer()
    prompt = "the quick brown fox jumps over the lazy dog " * 5
    report = ahakv_profile(model, tok, prompt, kvevict.make_policy("ahakv", recent_rows=R), tmp_path)
    n = len(tok(prompt).input_ids)
    budget = math.ceil(0.25 * n)
    picture = tmp_path / "ahakv_position_bias.png"
    assert picture.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    rows = {}
    labels = {"h2o", "h2o recent_fraction=0", "ahakv", "ahakv -RA", "ahakv -SG", "ahakv -VPE"}
    for line in report.splitlines():
        parts = line.rsplit(maxsplit=5)
        if len(parts) == 6 and parts[0] in labels:
            rows[parts[0]] = [float(x) for x in parts[1:]]
    assert set(rows) == labels
    for kept, second_half, first_tenth, _, mean_pos in rows.values():
        assert kept == budget and 0 <= second_half <= 1 and 0 <= first_tenth <= 1 and 0 < mean_pos < 1
    # h2o's recent half alone puts half of its budget in the second half of the context
    assert rows["h2o"][1] >= 0.5


# ---------------------------------------------------------------------------------------------- errors
@pytest.mark.parametrize("params, message", [
    (dict(recent_rows=0), "recent_rows"),
    (dict(recent_rows=2.5), "recent_rows"),
    (dict(pool_kernel=4), "pool_kernel"),
    (dict(pool_kernel=0), "pool_kernel"),
    (dict(group_reduction="sum"), "group_reduction"),
    (dict(step_gain="yes"), "step_gain"),
    (dict(value_prior=1), "value_prior"),
    (dict(budget=16), r"budget=16 is smaller than the protected tokens .*window=32"),
    (dict(budget=64, compression_ratio=0.5), "either compression_ratio or budget"),
])
def test_bad_parameters_raise(params, message):
    with pytest.raises(ValueError, match=message):
        kvevict.make_policy("ahakv", **params)


def test_defaults_follow_the_paper():
    policy = kvevict.make_policy("ahakv", budget=1000)
    assert (policy.recent_rows, policy.window, policy.decode_interval) == (32, 32, 1)
    assert policy.recent_accumulation and policy.step_gain and policy.value_prior
    assert kvevict.make_policy("ahakv", budget=1000, recent_rows=64).window == 64


def test_profile_refuses_a_budget_as_long_as_the_prompt():
    model, tok = tiny_model("llama"), tiny_tokenizer()
    with pytest.raises(ValueError, match="budget"):
        ahakv_profile(model, tok, "a short prompt", kvevict.make_policy("ahakv", budget=40, recent_rows=4),
                      "/nonexistent")


# ---------------------------------------------------------------------------------------------- real model
@pytest.mark.slow
def test_smollm2_cli_profile_and_generation(tmp_path, capsys):
    from kvevict.cli import main
    from kvevict.data import haystack

    model, tok = kvevict.load_model("smollm2-135m")
    prompt = haystack(tok, 600)
    (tmp_path / "prompt.txt").write_text(prompt)
    main(["profile", "--policy", "ahakv", "--model", "smollm2-135m", "--budget", "150",
          "--prompt-file", str(tmp_path / "prompt.txt"), "--out", str(tmp_path)])
    report = capsys.readouterr().out
    assert "budget 150 tokens" in report and (tmp_path / "ahakv_position_bias.png").stat().st_size > 10_000
    question = prompt + "\n\nIn one sentence, what is the text above about?"
    texts, cache = kvevict.generate(model, tok, [question], policy=kvevict.make_policy("ahakv", budget=200),
                                    max_new_tokens=12, return_cache=True)
    assert texts[0].strip()
    assert int(cache.kept_counts().max()) == 200 == int(cache.kept_counts().min())
