"""The evaluation sweep: policies x ratios x tasks on one model, resumable, with per-run files and a summary.

Layout of `out`:
    runs/<task>/<policy>-r<ratio>/{predictions.csv, metrics.json, config.json}
    summary.csv, summary.md, score_vs_ratio.png

Each sample's context is prefilled once for all runs that can share it: the prefill observes for every policy
(an ObserverSet), then each (policy, ratio) forks that cache, evicts, and answers. A run whose policy changes
the forward itself or prefills in chunks gets its own prefill. Ratio 0 is one shared `full` run.
"""

from __future__ import annotations

import csv
import gc
import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from ..api import encode_context_question, greedy_kwargs, prefill
from ..cache import EvictingCache
from ..compat import cache_kwargs
from ..policies import make_policy
from ..policies.base import ObserverSet, Policy
from . import metrics as M
from .tasks import QA_TASKS, Sample, check_task, make_samples

MAX_NEW_TOKENS = {"niah_single": 32, "niah_multikey": 32, "niah_multivalue": 64, "niah_multiquery": 64, "vt": 40,
                  "cwe": 64, "qa": 32}
LONGGEN_DECODE_INTERVAL = 32  # longgen evicts while decoding every this many tokens unless a policy says otherwise


@dataclass
class EvalConfig:
    model: str
    policies: list[str]
    ratios: list[float]
    tasks: list[str]
    context_length: int = 4096
    samples: int = 20
    seed: int = 0
    out: str = "runs/eval"
    policy_args: dict = field(default_factory=dict)  # for every policy, or {policy name: {...}}
    query_aware: bool = False
    dtype: str = "float32"
    max_new_tokens: int | None = None  # default: per task (MAX_NEW_TOKENS)
    continuation: int = 64  # fidelity: teacher-forced tokens
    longgen_tokens: int = 256
    chat_template: bool | None = None


@dataclass(frozen=True)
class Run:
    task: str
    policy: str
    ratio: float

    @property
    def key(self) -> str:
        return f"{self.policy}-r{self.ratio:g}"


def base_name(label: str) -> str:
    """The registered policy behind a label: "ahakv@no-ra" is the ahakv policy, labelled for its own runs."""
    return label.split("@", 1)[0]


def policy_params(cfg: EvalConfig, name: str, ratio: float, task: str) -> dict:
    """Parameters of the policy labelled `name`: --policy-args for every policy, or {label: {...}} per label."""
    args = cfg.policy_args
    per_policy = any(isinstance(v, dict) for v in args.values())
    params = dict(args.get(name, {}) if per_policy else args)
    if name != "full":
        params["compression_ratio"] = ratio
    if task == "longgen" and name != "full":
        params.setdefault("decode_interval", LONGGEN_DECODE_INTERVAL)
    return params


def build_policy(cfg: EvalConfig, run: Run) -> Policy:
    return make_policy(base_name(run.policy), **policy_params(cfg, run.policy, run.ratio, run.task))


def plan_runs(cfg: EvalConfig) -> list[Run]:
    runs = []
    for task in cfg.tasks:
        if 0 in cfg.ratios or 0.0 in cfg.ratios:
            runs.append(Run(task, "full", 0.0))
        for name in cfg.policies:
            if name == "full":
                continue
            runs.extend(Run(task, name, float(r)) for r in cfg.ratios if r > 0)
    return runs


def validate(cfg: EvalConfig) -> None:
    """Check everything that can be checked before loading a model; raise ValueError naming the parameter."""
    from ..models import context_window

    if not cfg.tasks:
        raise ValueError("tasks: give at least one")
    for task in cfg.tasks:
        check_task(task)
    if not cfg.ratios:
        raise ValueError("ratios: give at least one")
    for r in cfg.ratios:
        if not 0.0 <= r < 1.0:
            raise ValueError(f"ratios must be in [0, 1), got {r}")
    if cfg.samples < 1:
        raise ValueError(f"samples must be >= 1, got {cfg.samples}")
    if cfg.context_length < 256:
        raise ValueError(f"context_length must be >= 256 tokens, got {cfg.context_length}")
    if "fidelity" in cfg.tasks and not 0 < cfg.continuation < cfg.context_length // 2:
        raise ValueError(f"continuation must be in (0, context_length / 2), got {cfg.continuation}")
    for run in plan_runs(cfg):
        build_policy(cfg, run)  # unknown names and bad parameters fail here
    window = context_window(cfg.model)
    needed = cfg.context_length + 300 + (cfg.longgen_tokens if "longgen" in cfg.tasks else 0)
    if window is not None and needed > window:
        raise ValueError(
            f"context_length={cfg.context_length} (+ question and answer, {needed} tokens) exceeds the context window "
            f"of {cfg.model} ({window} tokens)"
        )


# ---------------------------------------------------------------------------------------------- one sample
def _ids(ids, device) -> torch.Tensor:
    return torch.tensor([list(ids)], device=device)


def _sizes(cache: EvictingCache) -> dict:
    return {"kv_bytes": cache.nbytes(), "full_bytes": cache.full_nbytes()}


def _greedy(model, tok, cache, ids: torch.Tensor, max_new_tokens: int, frozen: bool) -> list[int]:
    kwargs = greedy_kwargs(tok, max_new_tokens)
    with torch.no_grad():
        if frozen:
            with cache.frozen_tokens():
                out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), **cache_kwargs(cache), **kwargs)
        else:
            out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), **cache_kwargs(cache), **kwargs)
    return out[0, ids.shape[1]:].tolist()


def _same_size_groups(caches: dict) -> list[list]:
    """Runs grouped by what their caches keep per head: a group stacks into an equal-length (padding-free) batch."""
    groups: dict[tuple, list] = {}
    for run, cache in caches.items():
        groups.setdefault(tuple(cache.kept_counts().flatten().tolist()), []).append(run)
    return list(groups.values())


def _greedy_batch(model, tok, cache, ids: torch.Tensor, max_new_tokens: int) -> list[list[int]]:
    """Greedy answers for every row of a stacked cache (same prompt ids), with nothing evicted or kept after."""
    batch = ids.expand(cache.batch, -1)
    kwargs = greedy_kwargs(tok, max_new_tokens)
    with torch.no_grad(), cache.frozen_tokens():
        out = model.generate(input_ids=batch, attention_mask=torch.ones_like(batch), **cache_kwargs(cache), **kwargs)
    return [row[ids.shape[1]:].tolist() for row in out]


def _teacher_forced_logits(model, cache, ids: torch.Tensor) -> torch.Tensor:
    """Logits of `ids` [B, T] on top of `cache` (frozen: nothing is kept or evicted); [T, V] for B == 1."""
    mask = torch.ones(ids.shape[0], cache.seen + ids.shape[1], dtype=torch.long, device=ids.device)
    with torch.no_grad(), cache.frozen_tokens():
        logits = model(input_ids=ids, attention_mask=mask, **cache_kwargs(cache)).logits
    return logits[0] if ids.shape[0] == 1 else logits


class SampleEvaluator:
    """Runs one sample through every pending run of a task."""

    def __init__(self, model, tok, cfg: EvalConfig, runs: list[Run]):
        self.model, self.tok, self.cfg, self.runs = model, tok, cfg, runs
        self.device = model.device

    def _caches(self, prefix: torch.Tensor):
        """Yield (run, compressed cache) for every run; shared prefill where possible."""
        policies = {run: build_policy(self.cfg, run) for run in self.runs}
        shared = [r for r, p in policies.items() if not p.prefill_chunk and not type(p).alters_forward]
        observed = None
        if shared:
            observers = [policies[r] for r in shared if policies[r].evicts]
            observed = EvictingCache(self.model, ObserverSet(observers), tokenizer=self.tok)
            prefill(self.model, observed, prefix, torch.ones_like(prefix), None)
        for run, policy in policies.items():
            if run in shared:
                cache = observed.fork(policy)
                if policy.evicts:
                    cache.evict()
            else:
                cache = EvictingCache(self.model, policy, tokenizer=self.tok)
                prefill(self.model, cache, prefix, torch.ones_like(prefix), policy.prefill_chunk)
            yield run, cache

    def qa(self, sample: Sample) -> dict[Run, dict]:
        ctx, question = encode_context_question(self.tok, sample.context, sample.question, self.cfg.chat_template,
                                                answer_prefix=sample.answer_prefix)
        full = _ids(ctx + question, self.device)
        # query-agnostic: compress the context alone; query-aware: everything but the last token
        prefix = _ids(ctx, self.device) if not self.cfg.query_aware else full[:, :-1]
        max_new = self.cfg.max_new_tokens or MAX_NEW_TOKENS[sample.task]
        outputs, sizes = {}, {}
        caches = dict(self._caches(prefix))
        sizes = {run: _sizes(cache) for run, cache in caches.items()}
        if self.cfg.query_aware:
            # a policy that would evict while answering (decode_interval within the answer) answers alone
            for run in [r for r, c in caches.items() if (c.policy.decode_interval or max_new + 2) <= max_new + 1
                        and c.policy.evicts]:
                outputs[run] = _greedy(self.model, self.tok, caches.pop(run), full, max_new, frozen=False)
        # every other compressed context answers the same question in one batch, nothing evicted while answering;
        # equal-size caches side by side, so decode attention reads each run of them in one call
        if caches:
            runs = [run for group in _same_size_groups(caches) for run in group]
            stacked = EvictingCache.stack([caches.pop(run) for run in runs])
            outputs.update(zip(runs, _greedy_batch(self.model, self.tok, stacked, full, max_new)))
        rows = {}
        for run, out in outputs.items():
            prediction = self.tok.decode(out, skip_special_tokens=True)
            score = M.string_match(prediction, sample.references, sample.match)
            rows[run] = {"score": score, "prediction": prediction, "references": " | ".join(sample.references),
                         **sizes[run]}
        return rows

    def fidelity(self, sample: Sample) -> dict[Run, dict]:
        ctx, cont = sample.context_ids, sample.continuation_ids
        prefix = _ids(ctx[:-1], self.device)
        forced = _ids(ctx[-1:] + cont[:-1], self.device)
        targets = torch.tensor(cont, device=self.device)
        caches = dict(self._caches(prefix))
        sizes = {run: _sizes(cache) for run, cache in caches.items()}
        results = {}
        for group in _same_size_groups(caches):  # compressions of one size teacher-forced in one batch
            stacked = EvictingCache.stack([caches.pop(run) for run in group])
            logits = _teacher_forced_logits(self.model, stacked, forced.expand(stacked.batch, -1))
            results.update((run, (logits[i] if logits.dim() == 3 else logits, sizes[run])) for i, run in enumerate(group))
        reference = next((results[r][0] for r in results if r.policy == "full"), None)
        if reference is None:  # no ratio-0 run in this sweep: compute the full-cache reference once
            cache = EvictingCache(self.model, make_policy("full"))
            prefill(self.model, cache, prefix, torch.ones_like(prefix), None)
            reference = _teacher_forced_logits(self.model, cache, forced)
        rows = {}
        for run, (logits, sizes) in results.items():
            m = M.fidelity_metrics(reference, logits, targets)
            rows[run] = {**m, "prediction": "", "references": "", **sizes}
        return rows

    def longgen(self, sample: Sample) -> dict[Run, dict]:
        prompt = sample.context_ids
        ids = _ids(prompt, self.device)
        prefix = ids[:, :-1]
        new_tokens = sample.meta["new_tokens"]
        outputs, sizes = {}, {}
        for run, cache in self._caches(prefix):
            outputs[run] = _greedy(self.model, self.tok, cache, ids, new_tokens, frozen=False)
            sizes[run] = _sizes(cache)  # at the end of generation: decoding evicted too
        full_run = next((r for r in outputs if r.policy == "full"), None)
        reference = outputs[full_run] if full_run else self._full_generation(ids, new_tokens)
        judge = EvictingCache(self.model, make_policy("full"))
        prefill(self.model, judge, prefix, torch.ones_like(prefix), None)
        rows = {}
        for run, out in outputs.items():
            agreement = M.generation_agreement(reference, out)
            forced = _ids(prompt[-1:] + out[:-1], self.device)
            logits = _teacher_forced_logits(self.model, judge, forced)
            nll = torch.nn.functional.cross_entropy(logits.float(), torch.tensor(out, device=self.device)).item()
            rows[run] = {**agreement, "ppl_full_model": float(torch.tensor(nll).exp()),
                         "prediction": self.tok.decode(out, skip_special_tokens=True), "references": "", **sizes[run]}
        return rows

    def _full_generation(self, ids, new_tokens):
        cache = EvictingCache(self.model, make_policy("full"))
        prefill(self.model, cache, ids[:, :-1], torch.ones_like(ids[:, :-1]), None)
        return _greedy(self.model, self.tok, cache, ids, new_tokens, frozen=False)

    def __call__(self, sample: Sample) -> dict[Run, dict]:
        if sample.task in QA_TASKS:
            return self.qa(sample)
        if sample.task == "fidelity":
            return self.fidelity(sample)
        return self.longgen(sample)


# ---------------------------------------------------------------------------------------------- the sweep
def run_dir(out: Path, run: Run) -> Path:
    return out / "runs" / run.task / run.key


def run_config(cfg: EvalConfig, run: Run) -> dict:
    config = {k: v for k, v in asdict(cfg).items() if k not in ("policies", "ratios", "tasks", "out")}
    config.update(task=run.task, policy=run.policy, ratio=run.ratio,
                  policy_params=policy_params(cfg, run.policy, run.ratio, run.task))
    return json.loads(json.dumps(config))


def is_done(out: Path, cfg: EvalConfig, run: Run) -> bool:
    folder = run_dir(out, run)
    if not (folder / "metrics.json").is_file() or not (folder / "config.json").is_file():
        return False
    return json.loads((folder / "config.json").read_text()) == run_config(cfg, run)


def write_run(out: Path, cfg: EvalConfig, run: Run, rows: list[dict], seconds: float) -> dict:
    folder = run_dir(out, run)
    folder.mkdir(parents=True, exist_ok=True)
    columns = ["index"] + sorted({k for row in rows for k in row if k != "index"})
    with open(folder / "predictions.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    numeric = [k for k in columns if k != "index" and all(isinstance(r.get(k), (int, float)) for r in rows)]
    means = {k: sum(r[k] for r in rows) / len(rows) for k in numeric}
    summary = {"task": run.task, "policy": run.policy, "ratio": run.ratio, "n": len(rows),
               "score": M.primary_score(run.task, means), **{f"mean_{k}": v for k, v in means.items()},
               "kv_fraction": sum(r["kv_bytes"] / max(1, r["full_bytes"]) for r in rows) / len(rows),
               "seconds": seconds}
    (folder / "metrics.json").write_text(json.dumps(summary, indent=2))
    (folder / "config.json").write_text(json.dumps(run_config(cfg, run), indent=2))
    return summary


def run_eval(cfg: EvalConfig, model=None, tokenizer=None, progress: bool = True) -> list[dict]:
    """Run the sweep (skipping finished runs), write every file, return the summary rows."""
    from tqdm import tqdm

    validate(cfg)
    out = Path(cfg.out)
    runs = plan_runs(cfg)
    pending = [r for r in runs if not is_done(out, cfg, r)]
    if pending and model is None:
        from ..models import load_model

        model, tokenizer = load_model(cfg.model, dtype=cfg.dtype)
    if any(r.task == "qa" for r in pending):
        from .qa_data import load_qa_pool

        load_qa_pool(download=True)
    for task in cfg.tasks:
        todo = [r for r in pending if r.task == task]
        if not todo:
            continue
        options = {}
        if task == "fidelity":
            options = {"continuation": cfg.continuation}
        elif task == "longgen":
            options = {"new_tokens": cfg.longgen_tokens}
        samples = make_samples(task, tokenizer, cfg.context_length, cfg.samples, cfg.seed, **options)
        evaluate = SampleEvaluator(model, tokenizer, cfg, todo)
        rows: dict[Run, list[dict]] = {r: [] for r in todo}
        start = time.perf_counter()
        for sample in tqdm(samples, desc=f"{task} ({len(todo)} runs)", disable=not progress):
            for run, row in evaluate(sample).items():
                rows[run].append({"index": sample.index, **row})
            gc.collect()  # caches and policies point at each other: free this sample's caches now
        seconds = (time.perf_counter() - start) / len(todo)
        for run in todo:
            write_run(out, cfg, run, rows[run], seconds)
    return write_summary(out, cfg, runs)


def write_summary(out: Path, cfg: EvalConfig, runs: list[Run]) -> list[dict]:
    from .report import plot_scores, summary_table

    summaries = [json.loads((run_dir(out, r) / "metrics.json").read_text()) for r in runs]
    for s in summaries:
        s["model"] = cfg.model
    columns = ["model", "task", "policy", "ratio", "n", "score", "kv_fraction"] + sorted(
        {k for s in summaries for k in s if k.startswith("mean_")})
    with open(out / "summary.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(summaries)
    (out / "summary.md").write_text(summary_table(summaries, cfg))
    plot_scores(summaries, cfg, out / "score_vs_ratio.png")
    return summaries
