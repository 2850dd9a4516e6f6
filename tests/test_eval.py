"""Evaluation harness: deterministic tasks, needles where they say, scorers, resumable sweeps."""

import json

import pytest

from kvevict.cli import main
from kvevict.eval import EvalConfig, make_samples, run_eval
from kvevict.eval.metrics import generation_agreement, string_match
from kvevict.eval.runner import plan_runs, run_dir
from kvevict.models import tiny_model, tiny_tokenizer

QA_POOL = [
    {"passage": "The Amazon river flows through Brazil and empties into the Atlantic Ocean.",
     "question": "Into which ocean does the Amazon empty?", "answers": ["Atlantic Ocean"]},
    {"passage": "Mount Kilimanjaro is the highest mountain in Africa, in Tanzania.",
     "question": "Where is Kilimanjaro?", "answers": ["Tanzania"]},
    {"passage": "The violin has four strings tuned in perfect fifths.",
     "question": "How many strings does a violin have?", "answers": ["four"]},
]


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


@pytest.mark.parametrize("task", ["niah_single", "niah_multikey", "niah_multivalue", "niah_multiquery", "vt", "cwe",
                                  "fidelity", "longgen"])
def test_tasks_are_deterministic(tok, task):
    a = make_samples(task, tok, 600, 3, seed=1)
    b = make_samples(task, tok, 600, 3, seed=1)
    c = make_samples(task, tok, 600, 3, seed=2)
    assert a == b
    assert a != c


def test_needles_are_placed_at_their_depth(tok):
    samples = make_samples("niah_single", tok, 2000, 5, seed=0)
    depths = [s.meta["depth"] for s in samples]
    assert depths == sorted(depths) and depths[0] < 0.1 and depths[-1] > 0.9
    for s in samples:
        value = s.references[0]
        at = s.context.index(f"is: {value}.") / len(s.context)
        assert abs(at - s.meta["depth"]) < 0.1  # depth is measured in sentences, position in characters
        assert len(tok.encode(s.context)) <= 2000


def test_multi_needle_tasks_hide_every_reference(tok):
    for task, n_refs in [("niah_multikey", 1), ("niah_multivalue", 4), ("niah_multiquery", 4), ("vt", 5)]:
        for s in make_samples(task, tok, 1500, 2, seed=3):
            assert len(s.references) == n_refs
            assert all(ref in s.context for ref in s.references)
    multikey = make_samples("niah_multikey", tok, 1500, 1, seed=3)[0]
    assert multikey.context.count("special magic numbers for") == 4  # the asked key and three distractors


def test_cwe_common_words_are_most_frequent(tok):
    s = make_samples("cwe", tok, 1500, 1, seed=0)[0]
    words = [line.split(". ", 1)[1] for line in s.context.splitlines()[1:]]
    counts = {w: words.count(w) for w in set(words)}
    top = sorted(counts, key=counts.get, reverse=True)[:10]
    assert set(top) == set(s.references)


def test_qa_puts_the_gold_passage_among_distractors(tok):
    s = make_samples("qa", tok, 400, 2, seed=0, qa_pool=QA_POOL)[0]
    gold = next(p for p in QA_POOL if p["answers"] == s.references)
    assert gold["passage"] in s.context and s.context.count("Document") >= 2
    assert s.match == "any"


def test_scorers():
    assert string_match("The number is 1234567.", ["1234567"], "all") == 1.0
    assert string_match("The number is 7654321.", ["1234567"], "all") == 0.0
    assert string_match("ABCDE and FGHIJ", ["abcde", "fghij", "klmno"], "all") == pytest.approx(2 / 3)
    assert string_match("in tanzania", ["Kenya", "Tanzania"], "any") == 1.0
    assert generation_agreement([1, 2, 3, 4], [1, 2, 9, 4]) == {"prefix_agreement": 0.5, "token_agreement": 0.75}


def test_sweep_writes_every_file_and_skips_finished_runs(tok, tmp_path, monkeypatch):
    monkeypatch.setattr("kvevict.eval.qa_data.load_qa_pool", lambda download=False: QA_POOL)
    model = tiny_model("llama", max_position_embeddings=8192)
    cfg = EvalConfig(model="tiny", policies=["snapkv", "streamingllm"], ratios=[0, 0.5], context_length=300,
                     tasks=["niah_single", "qa", "fidelity", "longgen"], samples=2, out=str(tmp_path),
                     longgen_tokens=12, policy_args={"window": 8})
    run_eval(cfg, model=model, tokenizer=tok, progress=False)
    for name in ("summary.csv", "summary.md", "score_vs_ratio.png"):
        assert (tmp_path / name).is_file()
    for run in plan_runs(cfg):
        folder = run_dir(tmp_path, run)
        for name in ("predictions.csv", "metrics.json", "config.json"):
            assert (folder / name).is_file()
        metrics = json.loads((folder / "metrics.json").read_text())
        assert metrics["n"] == 2 and 0 <= metrics["score"] <= 100
        if run.policy != "full":
            assert metrics["kv_fraction"] < 0.75  # KV bytes kept are recorded, and eviction happened
    full_run = next(r for r in plan_runs(cfg) if r.task == "fidelity" and r.policy == "full")
    fidelity_full = json.loads((run_dir(tmp_path, full_run) / "metrics.json").read_text())
    assert fidelity_full["policy"] == "full" and fidelity_full["score"] == 100.0  # full agrees with itself
    stamp = {r: (run_dir(tmp_path, r) / "metrics.json").stat().st_mtime_ns for r in plan_runs(cfg)}

    def boom(*args, **kwargs):
        raise AssertionError("a finished run was evaluated again")

    monkeypatch.setattr("kvevict.eval.runner.SampleEvaluator.__call__", boom)
    run_eval(cfg, model=model, tokenizer=tok, progress=False)
    assert stamp == {r: (run_dir(tmp_path, r) / "metrics.json").stat().st_mtime_ns for r in plan_runs(cfg)}


@pytest.mark.parametrize("argv, message", [
    (["--tasks", "niah_single,bogus"], "unknown task 'bogus'"),
    (["--ratios", "0,1.0"], "ratios must be in"),
    (["--context-length", "9000"], "exceeds the context window"),
    (["--policies", "nope"], "unknown policy 'nope'"),
])
def test_eval_bad_input_fails_before_loading_a_model(argv, message, monkeypatch):
    def no_load(*args, **kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr("kvevict.models.load_model", no_load)
    with pytest.raises(SystemExit, match=message):
        main(["eval", "--model", "smollm2-135m", *argv])


def test_labelled_policy_variants_get_their_own_runs(tok, tmp_path):
    model = tiny_model("llama", max_position_embeddings=8192)
    cfg = EvalConfig(model="tiny", policies=["snapkv", "snapkv@w16"], ratios=[0.5], context_length=300,
                     tasks=["fidelity"], samples=1, out=str(tmp_path),
                     policy_args={"snapkv": {"window": 4}, "snapkv@w16": {"window": 16, "observation_window": 16}})
    rows = run_eval(cfg, model=model, tokenizer=tok, progress=False)
    assert {r["policy"] for r in rows} == {"snapkv", "snapkv@w16"}
    configs = [json.loads((run_dir(tmp_path, r) / "config.json").read_text()) for r in plan_runs(cfg)]
    assert [c["policy_params"]["window"] for c in configs] == [4, 16]


@pytest.mark.parametrize("policy", ["kvzip", "fastgen", "snapkv"])
def test_a_shared_prefill_evicts_as_the_policy_alone_would(tok, policy):
    import torch

    import kvevict
    from kvevict.api import prefill
    from kvevict.eval.runner import Run, SampleEvaluator

    torch.manual_seed(0)
    model = tiny_model("llama", max_position_embeddings=8192)
    cfg = EvalConfig(model="tiny", policies=[policy, "h2o"], ratios=[0.5], context_length=300,
                     tasks=["fidelity"], samples=1, out="unused")
    runs = plan_runs(cfg)
    prefix = torch.tensor([tok(" ".join(["alpha beta, gamma."] * 40)).input_ids[:200]])
    shared = dict(SampleEvaluator(model, tok, cfg, runs)._caches(prefix))
    alone = kvevict.EvictingCache(model, kvevict.make_policy(policy, compression_ratio=0.5), tokenizer=tok)
    prefill(model, alone, prefix, torch.ones_like(prefix), None)
    forked = shared[Run("fidelity", policy, 0.5)]

    def as_lists(x):
        return x.tolist() if torch.is_tensor(x) else [as_lists(v) for v in x]

    assert forked.compression() > 0.3
    for layer in range(model.config.num_hidden_layers):
        assert as_lists(forked.kept_positions(layer)) == as_lists(alone.kept_positions(layer))
