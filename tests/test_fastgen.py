"""FastGen: hand-made attention patterns get the expected head policies, recovery is computed as defined, the
chosen rules are what the cache keeps at prefill and keeps applying while decoding, and a target ratio is met."""

import math

import pytest
import torch
from transformers import DynamicCache

import kvevict
from kvevict.attention import allowed_keys
from kvevict.compat import cache_kwargs
from kvevict.models import tiny_model, tiny_tokenizer
from kvevict.policies.base import ObserverSet
from kvevict.policies.fastgen import (
    CANDIDATES,
    PUNCT,
    SPECIAL,
    group_attention,
    is_punctuation,
    profile_heads,
    search_threshold,
    special_token_ids,
    token_kinds,
)
from kvevict.profiling import PROFILES, achieved_ratio

from .conftest import left_padded_batch

TEXT = "<s>user: Hello, world. This is a test; of things! And more: words, words.\n" * 3


# ---------------------------------------------------------------------------------------------- hand-made maps
def causal_rows(weights: torch.Tensor) -> torch.Tensor:
    """Normalise each row of non-negative weights [n, n] over its causal part."""
    w = weights.tril()
    return w / w.sum(-1, keepdim=True)


def pattern_heads(n=100):
    """Three heads over one sequence: BOS only, a diagonal band of 3 tokens, uniform."""
    ones = torch.ones(n, n)
    bos = torch.zeros(n, n)
    bos[:, 0] = 1.0
    band = causal_rows(torch.triu(torch.tril(ones), diagonal=-2))
    uniform = causal_rows(ones)
    probs = torch.stack([bos, band, uniform]).unsqueeze(0)  # [1, 3, n, n]
    kinds = torch.zeros(1, 3, n)
    kinds[..., 0] = SPECIAL
    kinds[..., 10::10] = PUNCT  # a few punctuation tokens, as in real text
    positions = torch.arange(n).view(1, 1, n).expand(1, 3, n)
    cumulative = probs.sum(2)
    return probs, kinds, positions, torch.arange(n).view(1, n), cumulative, torch.tensor([n])


def test_hand_made_patterns_get_their_policies():
    probs, kinds, positions, queries, cumulative, prompt_len = pattern_heads()
    choice, recovery = profile_heads(probs, kinds, positions, queries, cumulative, prompt_len,
                                     recovery=0.95, sink_tokens=0)
    assert [CANDIDATES[int(c)] for c in choice[0]] == ["special", "special+punct+frequent+local", "full"]
    bos, band, uniform = recovery[0]
    assert bos[0] == pytest.approx(1.0)  # all of its attention is on BOS, a special token
    assert band[2] < 0.95 <= band[3]  # the band is not among the heavy hitters, the local window holds it
    assert band[3] == pytest.approx(1.0)
    assert uniform[3] < 0.95  # 30% heavy hitters + 30% window cannot hold a uniform map
    assert torch.allclose(recovery[..., 4], torch.ones(1, 3))
    # recovery is monotone along the nested candidates
    assert bool((recovery[..., 1:] >= recovery[..., :-1] - 1e-6).all())


def test_uniform_head_recovery_matches_closed_form():
    """Uniform head, no special/punct tokens: row i keeps ceil(0.3 (i+1)) heavy hitters (the earliest keys, which
    accumulate the most) and the last 30 keys, so its recovery is |union| / (i+1)."""
    n = 100
    probs = causal_rows(torch.ones(n, n)).view(1, 1, n, n)
    positions = torch.arange(n).view(1, 1, n)
    _, recovery = profile_heads(probs, torch.zeros(1, 1, n), positions, torch.arange(n).view(1, n), probs.sum(2),
                                torch.tensor([n]), sink_tokens=0)
    expected = []
    for i in range(n):
        frequent = set(range(math.ceil(0.3 * (i + 1))))
        local = set(range(max(0, i - 30 + 1), i + 1))
        expected.append(len(frequent | local) / (i + 1))
    assert recovery[0, 0, 3] == pytest.approx(sum(expected) / n, abs=1e-5)
    assert recovery[0, 0, 2] == pytest.approx(sum(math.ceil(0.3 * (i + 1)) / (i + 1) for i in range(n)) / n, abs=1e-5)
    assert recovery[0, 0, 0] == pytest.approx(0.0)


def reference_recovery(probs, kinds, key_pos, query_pos, cumulative, prompt_len, local_ratio, frequent_ratio, sink,
                       window):
    """The definition, row by row with Python sets."""
    B, H, w, L = probs.shape
    out = torch.zeros(B, H, 5, dtype=torch.float64)
    for b in range(B):
        rows = [i for i in range(w) if query_pos[b, i] >= 0]
        local_window = math.ceil(local_ratio * int(prompt_len[b]))
        for h in range(H):
            for i in rows:
                q = int(query_pos[b, i])
                visible = [j for j in range(L) if 0 <= key_pos[b, h, j] <= q]
                base = {j for j in visible if key_pos[b, h, j] < sink or kinds[b, h, j] == SPECIAL
                        or q - key_pos[b, h, j] < window}
                punct = {j for j in visible if kinds[b, h, j] == PUNCT}
                ranked = sorted(visible, key=lambda j: (-float(cumulative[b, h, j]), j))
                frequent = set(ranked[: math.ceil(frequent_ratio * len(visible))])
                local = {j for j in visible if q - key_pos[b, h, j] < local_window}
                for c, kept in enumerate([base, base | punct, base | punct | frequent,
                                          base | punct | frequent | local, set(visible)]):
                    out[b, h, c] += sum(float(probs[b, h, i, j]) for j in kept)
            out[b, h] /= max(1, len(rows))
    return out


@pytest.mark.parametrize("window,frequent_ratio,shuffled", [(3, 0.3, False), (0, 0.3, False), (0, 0.0, False),
                                                             (2, 1.0, False), (0, 0.45, True)])
def test_recovery_is_computed_as_defined(window, frequent_ratio, shuffled):
    """Against the definition row by row; `shuffled`: slots not in position order (each head its own order)."""
    torch.manual_seed(0)
    B, H, L, w = 2, 2, 40, 20
    key_pos = torch.arange(L).view(1, 1, L).repeat(B, H, 1)
    key_pos[1, :, 30:] = -1  # the second sequence is shorter: empty slots
    if shuffled:
        key_pos = key_pos.gather(-1, torch.argsort(torch.rand(B, H, L), dim=-1))
    query_pos = torch.arange(L - w, L).view(1, w).repeat(B, 1)
    query_pos[1] = torch.arange(30 - w, 30)
    query_pos[1, :3] = -1  # padding queries are ignored
    visible = (key_pos.unsqueeze(2) <= query_pos.view(B, 1, w, 1)) & (key_pos.unsqueeze(2) >= 0)
    probs = torch.softmax(torch.randn(B, H, w, L).masked_fill(~visible, float("-inf")), -1).nan_to_num()
    kinds = torch.randint(0, 3, (B, H, L)).float() * (torch.rand(B, H, L) < 0.4)
    cumulative = torch.randint(0, 5, (B, H, L)).float()  # many ties: broken by position
    prompt_len = torch.tensor([40, 30])
    choice, recovery = profile_heads(probs, kinds, key_pos, query_pos, cumulative, prompt_len, recovery=0.6,
                                     local_ratio=0.2, frequent_ratio=frequent_ratio, sink_tokens=2, window=window)
    expected = reference_recovery(probs, kinds, key_pos, query_pos, cumulative, prompt_len, 0.2, frequent_ratio, 2,
                                  window)
    assert torch.allclose(recovery.double(), expected, atol=1e-5)
    first_ok = [[next(c for c in range(5) if c == 4 or expected[b, h, c] >= 0.6) for h in range(H)] for b in range(B)]
    assert choice.tolist() == first_ok


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_group_attention_from_the_row_normalisers_equals_the_softmax(dtype):
    """The profile's probabilities from the prefill's log-sum-exps (exp(s q.k - lse), mask after the group mean)
    equal the masked softmax they replace, with padding queries, empty slots and GQA."""
    torch.manual_seed(0)
    B, H, G, t, L, d = 2, 2, 3, 24, 40, 16
    queries = (torch.randn(B, H, G, t, d) * 2).to(dtype)
    keys = (torch.randn(B, H, L, d) * 2).to(dtype)
    query_positions = torch.arange(L - t, L)
    key_positions = torch.arange(L).view(1, 1, L).repeat(B, H, 1)
    key_positions[1, :, :5] = -1  # left padding of the second row: empty slots
    query_valid = torch.ones(B, t, dtype=torch.bool)
    query_valid[1, :2] = False
    scaling = d**-0.5
    expected = group_attention(queries, keys, query_positions, key_positions, scaling, query_valid)
    logits = torch.einsum("bhgtd,bhld->bhgtl", queries.float(), keys.float()) * scaling
    allowed = allowed_keys(query_positions, key_positions).unsqueeze(2)
    lse = logits.masked_fill(~allowed, float("-inf")).logsumexp(-1).reshape(B, H * G, t)
    got = group_attention(queries, keys, query_positions, key_positions, scaling, query_valid, lse=lse)
    assert torch.isfinite(got).all()
    assert torch.allclose(got, expected, atol=1e-6, rtol=1e-5)
    assert (got[1, :, :2] == 0).all() and (got[1, :, :, :5] == 0).all()


# ---------------------------------------------------------------------------------------------- token kinds
def test_special_and_punctuation_tokens_of_the_tiny_tokenizer():
    tok = tiny_tokenizer()
    kinds = token_kinds(tok)
    assert kinds.shape == (len(tok),)
    ids = {text: tok.convert_tokens_to_ids(text) for text in ("<pad>", "<s>", "</s>")}
    assert all(kinds[i] == SPECIAL for i in ids.values())
    for text in (".", ",", "?", ":", " ", "\n", "!", "(", "-"):
        (token_id,) = tok.encode(text, add_special_tokens=False)
        assert kinds[token_id] == PUNCT, text
    for text in ("a", "Z", "7"):
        (token_id,) = tok.encode(text, add_special_tokens=False)
        assert kinds[token_id] == 0, text
    # byte tokens that are not text on their own (partial UTF-8) are neither
    assert int((kinds == PUNCT).sum()) == sum(is_punctuation(tok.decode([i])) for i in range(len(tok)))
    partial = [i for i in range(len(tok)) if tok.decode([i]) == "\ufffd"]
    assert len(partial) == 128 and all(kinds[i] == 0 for i in partial)  # bytes 0x80-0xff
    assert token_kinds(tok) is kinds  # computed once per tokenizer


def test_chat_template_tokens_count_as_special():
    tok = tiny_tokenizer()
    tok.add_tokens(["<|turn|>", "\n\n"])  # added as ordinary (non-special) tokens
    tok.chat_template = "{% for m in messages %}<|turn|>{{ m['content'] }}\n\n{% endfor %}"
    turn, blank = tok.convert_tokens_to_ids("<|turn|>"), tok.convert_tokens_to_ids("\n\n")
    assert turn in special_token_ids(tok)
    assert blank not in special_token_ids(tok)
    kinds = token_kinds(tok)
    assert kinds[turn] == SPECIAL and kinds[blank] == PUNCT


def test_is_punctuation():
    assert is_punctuation(" .") and is_punctuation("\n") and is_punctuation("...") and is_punctuation("“")
    assert not is_punctuation("") and not is_punctuation(" a") and not is_punctuation("\ufffd")


# ---------------------------------------------------------------------------------------------- in the cache
def prefill(model, policy, ids, mask=None, tokenizer=None):
    cache = kvevict.EvictingCache(model, policy, tokenizer=tokenizer)
    with torch.no_grad():
        model(input_ids=ids, attention_mask=mask, **cache_kwargs(cache))
    return cache


@pytest.mark.parametrize("window_args,texts", [({}, [TEXT, TEXT[:120]]), ({"profile_window": 16}, [TEXT, TEXT[:120]]),
                                               ({"profile_memory_mb": 5e-3}, [TEXT, TEXT[:120]]), ({}, [TEXT]),
                                               ({"profile_window": 16}, [TEXT])])
def test_policy_profile_equals_profile_of_eager_attention(window_args, texts):
    """The cache's block-wise profile (padding, GQA mean, causal cut) equals profile_heads on the eager map. One
    unpadded row: the probabilities come from the prefill's own log-sum-exps."""
    tok = tiny_tokenizer()
    enc = tok(texts, return_tensors="pt", padding=True)
    ids, mask = enc.input_ids, enc.attention_mask
    reference = tiny_model("llama")
    reference.set_attn_implementation("eager")
    with torch.no_grad():
        attn = reference(input_ids=ids, attention_mask=mask, **cache_kwargs(DynamicCache(config=reference.config)),
                         output_attentions=True).attentions
    policy = kvevict.make_policy("fastgen", tokenizer=tok, recovery=0.9, **window_args)
    state = prefill(tiny_model("llama"), policy, ids, mask).state
    H = reference.config.num_key_value_heads
    kinds_table = token_kinds(tok)
    for layer, got in state.head_recovery().items():
        for b in range(len(texts)):
            n = int(mask[b].sum())
            group = attn[layer][b, :, -n:, -n:].reshape(H, -1, n, n).mean(1).unsqueeze(0)  # [1, H, n, n]
            read = n if window_args.get("profile_window") is None else min(n, window_args["profile_window"])
            rows = read if "profile_memory_mb" not in window_args else state.profiles[layer].rows
            kinds = kinds_table[ids[b, -n:]].float().view(1, 1, n).expand(1, H, n)
            positions = torch.arange(n).view(1, 1, n).expand(1, H, n)
            _, expected = profile_heads(group[:, :, -rows:], kinds, positions, torch.arange(n - rows, n).view(1, -1),
                                        group[:, :, -read:].sum(2), torch.tensor([n]), recovery=0.9)
            assert torch.allclose(got[b], expected[0], atol=1e-4)
    if "profile_memory_mb" in window_args:
        assert 0 < state.profiles[0].rows < 120  # the memory cap cut the profiled rows


def kept_sets(cache, layer, b=0):
    return [set(p.tolist()) for p in cache.kept_positions(layer)[b]]


def check_rules(cache, ids, b=0):
    """Every head keeps what its policy says, checked from the token ids alone (plus heavy hitters' budget)."""
    state, policy = cache.state, cache.policy
    kinds = token_kinds(state.tokenizer)[ids[b]]
    seen = ids.shape[1]
    special = {i for i in range(seen) if kinds[i] == SPECIAL} | set(range(policy.sink_tokens))
    punct = {i for i in range(seen) if kinds[i] == PUNCT}
    for layer, choice in state.head_choices().items():
        window = int(state.profiles[layer].local_window[b])
        for h, kept in enumerate(kept_sets(cache, layer, b)):
            c = int(choice[b, h])
            if c == 0:
                assert kept == special
            elif c == 1:
                assert kept == special | punct
            elif c == 2:
                assert special | punct <= kept
                assert len(kept - special - punct) <= math.ceil(policy.frequent_ratio * seen)
                assert len(kept) >= min(seen, math.ceil(policy.frequent_ratio * seen))
            elif c == 3:
                assert special | punct | set(range(seen - window, seen)) <= kept
            else:
                assert kept == set(range(seen))


@pytest.mark.parametrize("family,recovery", [("llama", 0.1), ("llama", 0.3), ("llama", 0.7), ("qwen2", 0.95),
                                             ("gemma3", 0.5)])
def test_prefill_keeps_each_heads_rule(family, recovery):
    tok = tiny_tokenizer()
    ids = tok(TEXT, return_tensors="pt").input_ids
    policy = kvevict.make_policy("fastgen", tokenizer=tok, recovery=recovery)
    cache = prefill(tiny_model(family), policy, ids)
    check_rules(cache, ids)
    counts = cache.kept_counts()
    for layer, kept in cache.state.candidate_kept().items():  # the profile's counts are what the cache holds
        assert torch.equal(kept.gather(-1, cache.state.head_choices()[layer].unsqueeze(-1)).squeeze(-1), counts[layer])
    assert float(achieved_ratio(cache)[0]) == pytest.approx(float(cache.state.profile_ratio()[0]))


@pytest.mark.parametrize("recovery", [0.3, 0.7, 0.95])
def test_decoding_keeps_applying_each_heads_rule(recovery):
    tok = tiny_tokenizer()
    prompt = tok(TEXT, return_tensors="pt").input_ids
    new = tok(" next<s>words, more. and\n:", return_tensors="pt", add_special_tokens=False).input_ids
    interval = 4
    model = tiny_model("qwen2" if recovery == 0.95 else "llama")
    policy = kvevict.make_policy("fastgen", tokenizer=tok, recovery=recovery, decode_interval=interval)
    cache = prefill(model, policy, prompt)
    steps = interval * (new.shape[1] // interval)
    with torch.no_grad():
        for t in range(steps):
            model(input_ids=new[:, t:t + 1], **cache_kwargs(cache))
    ids = torch.cat([prompt, new[:, :steps]], dim=1)
    check_rules(cache, ids)
    counts = cache.kept_counts()
    assert len(set(counts.flatten().tolist())) > 1  # heads keep different numbers of tokens
    seen = int(cache.tokens_seen[0])
    for layer in cache.layers:  # memory follows: each head holds what it keeps + the next interval's room,
        kept = counts[layer.layer_idx]  # never more rows than the full cache holds
        assert layer.store.rows == int((kept + interval).clamp(max=seen).sum())
    assert cache.nbytes() < prefill(model, kvevict.make_policy("full"), ids).nbytes()


def test_generate_with_a_left_padded_batch():
    tok = tiny_tokenizer()
    policy = kvevict.make_policy("fastgen", recovery=0.6, decode_interval=4)  # tokenizer comes from generate()
    texts, cache = kvevict.generate(tiny_model("llama"), tok, [TEXT, "hi. there, you"], policy=policy,
                                    max_new_tokens=9, return_cache=True)
    assert len(texts) == 2
    ratio = achieved_ratio(cache)
    assert bool((ratio > 0).all()) and bool((ratio < 1).all())
    assert cache.state.threshold.tolist() == pytest.approx([0.6, 0.6])


def test_answer_compresses_the_context_once():
    tok = tiny_tokenizer()
    policy = kvevict.make_policy("fastgen", recovery=0.6)
    answers, cache = kvevict.answer(tiny_model("llama"), tok, TEXT, ["what?", "who, then?"], policy=policy,
                                    max_new_tokens=5, return_cache=True)
    assert len(answers) == 2
    assert cache.seen == int(cache.state.profiles[0].prompt_len)  # the questions and answers were dropped again
    assert float(achieved_ratio(cache)[0]) == pytest.approx(float(cache.state.profile_ratio()[0]))


# ---------------------------------------------------------------------------------------------- target ratio
def test_search_threshold_on_a_hand_made_table():
    # two heads; kept counts per candidate out of 100 tokens each (total 200)
    recovery = torch.tensor([[0.2, 0.5, 0.9, 0.97, 1.0], [0.6, 0.8, 0.93, 0.99, 1.0]])
    kept = torch.tensor([[5, 10, 40, 70, 100], [5, 20, 45, 75, 100]]).double()
    # T = 0.93: head 0 -> candidate 3 (70), head 1 -> 2 (45): ratio 1 - 115/200 = 0.425
    # T = 0.97: head 0 -> 3 (70), head 1 -> 3 (75): ratio 0.275; up to 0.99: head 0 -> full: 0.125; T = 1: 0
    assert search_threshold(recovery, kept, 200.0, 0.4) == pytest.approx((0.93, 0.425))
    assert search_threshold(recovery, kept, 200.0, 0.2) == pytest.approx((0.97, 0.275))
    assert search_threshold(recovery, kept, 200.0, 0.1) == pytest.approx((0.99, 0.125))
    assert search_threshold(recovery, kept, 200.0, 0.0) == pytest.approx((1.0, 0.0))
    with pytest.warns(UserWarning, match="out of reach"):
        assert search_threshold(recovery, kept, 200.0, 0.99) == pytest.approx((0.0, 0.95))


@pytest.mark.parametrize("target", [0.3, 0.5])
def test_target_ratio_is_met_within_one_head_step(target):
    """ratio(T) is a step function; the search returns the largest T with ratio >= target, so the achieved ratio
    exceeds the target by less than the largest change one head can make (full -> its cheapest policy)."""
    tok = tiny_tokenizer()
    ids = tok(TEXT, return_tensors="pt").input_ids
    policy = kvevict.make_policy("fastgen", tokenizer=tok, compression_ratio=target)
    cache = prefill(tiny_model("llama"), policy, ids)
    achieved = float(achieved_ratio(cache)[0])
    kept = torch.stack(list(cache.state.candidate_kept().values())).double()  # [N, 1, H, 5]
    total = ids.shape[1] * kept.shape[0] * kept.shape[2]
    step = float((kept[..., 4] - kept[..., 0]).max()) / total
    assert target <= achieved < target + step
    # nothing better exists: a slightly higher T (the next recovery value) falls below the target
    T = float(cache.state.threshold[0])
    higher = torch.stack(list(cache.state.head_recovery().values()))
    higher = higher[higher > T]
    if higher.numel():
        other = kvevict.make_policy("fastgen", tokenizer=tok, recovery=float(higher.min()))
        other_cache = prefill(tiny_model("llama"), other, ids)
        assert float(achieved_ratio(other_cache)[0]) < target
    assert cache.compression() == pytest.approx(achieved, abs=1e-6)


def test_one_profile_serves_every_threshold():
    """Profiling does not depend on T: an observed prefill forks into FastGen caches for several T."""
    tok = tiny_tokenizer()
    ids = tok(TEXT, return_tensors="pt").input_ids
    model = tiny_model("llama")
    observer = ObserverSet([kvevict.make_policy("fastgen", tokenizer=tok)])
    observed = prefill(model, observer, ids, tokenizer=tok)
    ratios = []
    for recovery in (0.5, 0.9, 0.98):
        twin = observed.fork(kvevict.make_policy("fastgen", tokenizer=tok, recovery=recovery))
        twin.evict()
        alone = kvevict.make_policy("fastgen", tokenizer=tok, recovery=recovery)
        assert torch.equal(twin.kept_counts(), prefill(model, alone, ids).kept_counts())
        ratios.append(float(achieved_ratio(twin)[0]))
    assert ratios == sorted(ratios, reverse=True)


# ---------------------------------------------------------------------------------------------- report
def test_profile_report_and_heat_map(tmp_path):
    tok = tiny_tokenizer()
    model = tiny_model("gemma3")
    report = PROFILES["fastgen"](model, tok, TEXT, kvevict.make_policy("fastgen", recovery=0.9), tmp_path)
    assert "heads per policy" in report and "compression ratio" in report and "profiling" in report
    pngs = list(tmp_path.glob("*.png"))
    assert len(pngs) == 1 and pngs[0].stat().st_size > 1000
    assert report.count("\n    1 |") == 1 and "\n    0 |" not in report  # only the global layers are profiled


# ---------------------------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("params,match", [
    ({"recovery": 1.5}, "recovery"), ({"recovery": -0.1}, "recovery"), ({"local_ratio": 0.0}, "local_ratio"),
    ({"frequent_ratio": 1.2}, "frequent_ratio"), ({"profile_window": 0}, "profile_window"),
    ({"profile_memory_mb": 0}, "profile_memory_mb"), ({"budget": 64}, "budget"),
    ({"allocation": "head"}, "allocation"), ({"compression_ratio": 1.0}, "compression_ratio"),
    ({"sink_tokens": -1}, "sink_tokens"),
])
def test_bad_parameters(params, match):
    with pytest.raises(ValueError, match=match):
        kvevict.make_policy("fastgen", **params)


def test_missing_tokenizer_or_token_ids():
    model = tiny_model("llama")
    ids, _ = left_padded_batch((12,))
    with pytest.raises(ValueError, match="tokenizer"):
        prefill(model, kvevict.make_policy("fastgen"), ids)
    policy = kvevict.make_policy("fastgen", tokenizer=tiny_tokenizer())
    cache = kvevict.EvictingCache(model, policy)
    with pytest.raises(ValueError, match="input_ids"), torch.no_grad():
        model(inputs_embeds=model.get_input_embeddings()(ids), **cache_kwargs(cache))


# ---------------------------------------------------------------------------------------------- real model
@pytest.mark.slow
def test_smollm2_chat_tokens_and_profile():
    model, tok = kvevict.load_model("smollm2-135m")
    kinds = token_kinds(tok)
    assert kinds[tok.convert_tokens_to_ids("<|im_start|>")] == SPECIAL
    assert kinds[tok.convert_tokens_to_ids("<|im_end|>")] == SPECIAL
    assert kinds[tok.encode(".", add_special_tokens=False)[0]] == PUNCT
    policy = kvevict.make_policy("fastgen", recovery=0.95)
    texts, cache = kvevict.generate(model, tok, ["Name three colours of the rainbow, then explain why the sky is "
                                                 "blue in two sentences."], policy=policy, max_new_tokens=8,
                                    return_cache=True)
    assert texts[0].strip()
    recovery = torch.stack(list(cache.state.head_recovery().values()))[:, 0]  # [layers, H, 5]
    chosen = recovery.gather(-1, torch.stack(list(cache.state.head_choices().values()))[:, 0].unsqueeze(-1))
    assert float(chosen.min()) >= 0.95 - 1e-6
    assert 0.0 < float(achieved_ratio(cache)[0]) < 1.0
