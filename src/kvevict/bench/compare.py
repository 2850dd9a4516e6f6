"""Overheads as ratios to the plain path, measured in one process (`python -m kvevict.bench --compare`).

On a shared machine absolute seconds drift from run to run, ratios taken in one run far less: each overhead is
timed next to its plain path, alternating, best of `repeats`. Rows:

- fastgen: time FastGen spends profiling the prompt / a plain prefill (default `profile_window`, and every row);
- kvzip: a KVzip prefill (its repeat passes and scoring included) / a plain prefill (the scores' default
  precision, and float32);
- fastkvzip: time in the Fast KVzip gates during a prefill / a plain prefill (the gates' default precision, and
  float32);
- decode: decode tokens/s with `head` and `global` allocation / `uniform`, all SnapKV at `ratio`, forked from one
  observed prefill and stepped in turn.

A plain prefill is the same prompt through an EvictingCache with the `full` policy.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

ROWS = ("fastgen", "kvzip", "fastkvzip", "decode")


@dataclass
class CompareSpec:
    model: str = "smollm2-135m"
    context: int = 4096
    dtype: str = "bfloat16"
    device: str = "cpu"  # the fused kernels compared here are the CPU ones
    threads: int | None = None
    repeats: int = 2
    ratio: float = 0.75  # decode row: SnapKV's ratio
    kvzip_ratio: float = 0.7  # kvzip and fastkvzip rows
    decode_tokens: int = 64
    rows: list = field(default_factory=lambda: list(ROWS))

    def __post_init__(self):
        unknown = sorted(set(self.rows) - set(ROWS))
        if unknown or not self.rows:
            raise ValueError(f"unknown or no rows {unknown}; choose from {list(ROWS)}")
        for name in ("context", "repeats", "decode_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")


def _prefill(model, cache, ids) -> float:
    import torch

    from ..compat import cache_kwargs

    with torch.no_grad():
        started = time.perf_counter()
        model(input_ids=ids, **cache_kwargs(cache), logits_to_keep=1)
        return time.perf_counter() - started


def compare(spec: CompareSpec, out: Path | None = None) -> dict:
    """Measure every row of `spec` in this process; print a table; write JSON to `out`."""
    import torch

    from ..cache import EvictingCache
    from ..data import haystack
    from ..policies import make_policy
    from ..policies.base import ObserverSet
    from ..policies.fastgen import token_kinds
    from . import _machine, load_bench_model, write_json

    if spec.threads:
        torch.set_num_threads(spec.threads)
    model, tok = load_bench_model(spec.model, spec.dtype, "cpu")
    ids = tok(haystack(tok, spec.context), return_tensors="pt", add_special_tokens=False).input_ids[:, :spec.context]
    token_kinds(tok)  # FastGen's vocabulary look-up is made once per tokenizer: not part of a prefill

    def plain() -> float:
        return _prefill(model, EvictingCache(model, make_policy("full")), ids)

    plain()  # warm-up
    results = []

    def best_of(measure) -> tuple[float, float]:
        """min over repeats of (plain prefill s, overhead s), the two taken back to back."""
        pairs = [(plain(), measure()) for _ in range(spec.repeats)]
        return min(p for p, _ in pairs), min(o for _, o in pairs)

    def add(row, what, plain_s, overhead_s, ratio, **extra):
        results.append({"row": row, "what": what, "plain_s": plain_s, "overhead_s": overhead_s, "ratio": ratio,
                        **extra})
        print(f"{row}: {what}: {ratio:.4f} ({overhead_s:.2f} s / {plain_s:.2f} s)", flush=True)

    if "fastgen" in spec.rows:
        default_window = make_policy("fastgen").profile_window
        for window in dict.fromkeys((default_window, None)):
            def profiled(window=window) -> float:
                cache = EvictingCache(model, make_policy("fastgen", profile_window=window), tokenizer=tok)
                _prefill(model, cache, ids)
                return cache.state.profile_seconds
            plain_s, profile_s = best_of(profiled)
            add("fastgen", f"profiling, profile_window={window}", plain_s, profile_s, profile_s / plain_s,
                profile_window=window)
    if "kvzip" in spec.rows:
        for precision in ("model", "float32"):
            policy = make_policy("kvzip", compression_ratio=spec.kvzip_ratio, tokenizer=tok, score_precision=precision)
            plain_s, kvzip_s = best_of(lambda policy=policy: _prefill(model, EvictingCache(model, policy), ids))
            add("kvzip", f"prefill with scoring passes / plain prefill, score_precision={precision}", plain_s, kvzip_s,
                kvzip_s / plain_s, score_precision=precision)
    if "fastkvzip" in spec.rows:
        for precision in ("model", "float32"):
            policy = make_policy("fastkvzip", compression_ratio=spec.kvzip_ratio, gate_precision=precision)

            def gated(policy=policy) -> float:
                cache = EvictingCache(model, policy)
                _prefill(model, cache, ids)
                return cache.state.gate_seconds
            plain_s, gate_s = best_of(gated)
            add("fastkvzip", f"gates during prefill / plain prefill, gate_precision={precision}", plain_s, gate_s,
                gate_s / plain_s, gate_precision=precision)
    if "decode" in spec.rows:
        _compare_decode(model, ids, spec, add, EvictingCache, make_policy, ObserverSet)
    result = {"spec": asdict(spec), "machine": _machine(spec), "rows": results}
    write_json(result, out)
    return result


def _compare_decode(model, ids, spec, add, EvictingCache, make_policy, ObserverSet) -> None:
    """Decode steps of uniform / head / global allocation in turn over forks of one observed prefill."""
    import torch

    from ..compat import cache_kwargs

    allocations = ("uniform", "head", "global")
    policies = {a: make_policy("snapkv", compression_ratio=spec.ratio, allocation=a) for a in allocations}
    observed = EvictingCache(model, ObserverSet([policies["uniform"]]))
    with torch.no_grad():
        out = model(input_ids=ids, **cache_kwargs(observed), logits_to_keep=1)
    first = out.logits[:, -1:].argmax(-1)
    caches, tokens, seconds = {}, {}, dict.fromkeys(allocations, 0.0)
    for a in allocations:
        caches[a] = observed.fork(policies[a])
        caches[a].evict()
        tokens[a] = first
    del observed
    with torch.no_grad():
        for step in range(spec.decode_tokens + 2):
            for a in allocations:
                started = time.perf_counter()
                out = model(input_ids=tokens[a], **cache_kwargs(caches[a]))
                if step >= 2:  # the first steps warm up
                    seconds[a] += time.perf_counter() - started
                tokens[a] = out.logits[:, -1:].argmax(-1)
    rate = {a: spec.decode_tokens / seconds[a] for a in allocations}
    for a in ("head", "global"):
        add("decode", f"tok/s with {a} allocation / uniform", 1.0 / rate["uniform"], 1.0 / rate[a],
            rate[a] / rate["uniform"], tok_per_s={a: rate[a], "uniform": rate["uniform"]},
            kv_bytes={a: caches[a].nbytes(), "uniform": caches["uniform"].nbytes()})


def format_table(result: dict) -> str:
    spec = result["spec"]
    lines = [f"model={spec['model']} context={spec['context']} dtype={spec['dtype']} repeats={spec['repeats']}",
             "| row | what | ratio | overhead s | plain s |", "|---|---|---:|---:|---:|"]
    for r in result["rows"]:
        lines.append(f"| {r['row']} | {r['what']} | {r['ratio']:.3f} | {r['overhead_s']:.2f} | {r['plain_s']:.2f} |")
    return "\n".join(lines)
