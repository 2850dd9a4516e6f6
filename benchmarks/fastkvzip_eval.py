"""Fast KVzip on a real model: how well the shipped gates predict KVzip's scores on held-out essays, what the gates
and KVzip cost at prefill, and quality against KVzip, SnapKV and H2O (through the evaluation harness).

    python benchmarks/fastkvzip_eval.py --model smollm2-135m --out results/fastkvzip/smollm2-135m

Writes under --out: heldout.json (BCE and accuracy@0.05 of the trained gates and of untrained ones on the held-out
essays), cost.json (prefill seconds with the full cache, with fastkvzip, with kvzip, and the gates alone; ms per
decoded token, full vs fastkvzip), eval/ (the harness's sweep) and summary.md.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

import kvevict
import kvevict.data
from kvevict.compat import cache_kwargs
from kvevict.eval import EvalConfig, run_eval
from kvevict.gates.checkpoint import shipped_gates
from kvevict.gates.sink_gate import build_gates, load_gates
from kvevict.train.fastkvzip import KIND, collect_document, gate_metrics, held_out_essays, render_context


def heldout(model, tok, folder, tokens_per_essay: int) -> dict:
    """Gate predictions vs KVzip targets on the essays training never saw; untrained gates (seed 0) for scale."""
    meta, trained = load_gates(folder, model)
    torch.manual_seed(0)
    untrained = build_gates(meta["hyper"], meta["layers"]).float().eval()
    hidden, targets = {}, {}
    for _, text in held_out_essays():
        h, t = collect_document(model, tok, render_context(tok, text)[:tokens_per_essay])
        for i in h:
            hidden.setdefault(i, []).append(h[i])
            targets.setdefault(i, []).append(t[i])
    hidden = {i: torch.cat(v) for i, v in hidden.items()}
    targets = {i: torch.cat(v) for i, v in targets.items()}
    rows = torch.arange(len(next(iter(targets.values()))))
    return {"tokens": len(rows), "essays": [name for name, _ in held_out_essays()],
            "trained": gate_metrics(trained, hidden, targets, rows),
            "untrained": gate_metrics(untrained, hidden, targets, rows),
            "training": {k: meta["training"].get(k) for k in ("tokens", "collect_seconds", "fit_seconds", "steps")}}


def _timed_prefill(model, tok, policy, ids, decode: int = 0) -> tuple[float, float, kvevict.EvictingCache]:
    cache = kvevict.EvictingCache(model, policy, tokenizer=tok)
    with torch.no_grad():
        t0 = time.perf_counter()
        out = model(input_ids=ids, **cache_kwargs(cache))
        nxt = out.logits[:, -1:].argmax(-1)  # the cache evicted at the end of this forward (kvzip: repeat passes)
        t1 = time.perf_counter()
        for _ in range(decode):
            nxt = model(input_ids=nxt, **cache_kwargs(cache)).logits[:, -1:].argmax(-1)
        t2 = time.perf_counter()
    return t1 - t0, (t2 - t1) / max(1, decode), cache


def cost(model, tok, folder, length: int, ratio: float, decode: int, repeats: int) -> dict:
    """Best-of-`repeats` prefill seconds (full, fastkvzip, kvzip) and decode ms/token (full, fastkvzip)."""
    ids = tok(kvevict.data.haystack(tok, length), return_tensors="pt").input_ids[:, :length]
    best: dict[str, list[float]] = {}
    for name, params in [("full", {}), ("fastkvzip", {"compression_ratio": ratio, "gates": str(folder)}),
                         ("kvzip", {"compression_ratio": ratio})]:
        for _ in range(repeats):
            policy = kvevict.make_policy(name, **params)
            prefill_s, decode_s, cache = _timed_prefill(model, tok, policy, ids, decode if name != "kvzip" else 0)
            old = best.get(name, [float("inf"), float("inf")])
            best[name] = [min(old[0], prefill_s), min(old[1], decode_s)]
            saved = cache.compression()
    _, gates = load_gates(folder, model)
    hidden = torch.randn(length, model.config.hidden_size, dtype=model.dtype)  # as the gates get them in the model
    gates_alone = float("inf")
    with torch.no_grad():
        for _ in range(repeats):
            t0 = time.perf_counter()
            for gate in gates.values():
                gate(hidden, model_precision=True)  # the policy's default gate_precision
            gates_alone = min(gates_alone, time.perf_counter() - t0)
    return {"length": ids.shape[1], "ratio": ratio, "repeats": repeats, "decode_tokens": decode,
            "threads": torch.get_num_threads(), "prefill_s": {k: v[0] for k, v in best.items()},
            "decode_ms_per_token": {k: 1e3 * v[1] for k, v in best.items() if k != "kvzip"},
            "gates_alone_s": gates_alone, "gate_parameters": sum(p.numel() for p in gates.parameters()),
            "kvzip_bytes_saved": saved}


def write_summary(out: Path, model_name: str) -> str:

    lines = [f"# Fast KVzip on {model_name}", ""]
    if (out / "heldout.json").is_file():
        h = json.loads((out / "heldout.json").read_text())
        tr = h["training"]
        lines += [f"## Predicting KVzip scores on held-out essays ({h['tokens']:,} tokens: {', '.join(h['essays'])})", "",
                  "| gates | BCE (sum over heads) | accuracy@0.05 |", "|---|---:|---:|",
                  f"| trained | {h['trained']['bce']:.4f} | {h['trained']['accuracy']:.3f} |",
                  f"| untrained (seed 0) | {h['untrained']['bce']:.4f} | {h['untrained']['accuracy']:.3f} |", "",
                  f"Training: {tr['tokens']:,} tokens, collection {tr['collect_seconds']} s, fit {tr['steps']} steps "
                  f"in {tr['fit_seconds']} s.", ""]
    if (out / "cost.json").is_file():
        c = json.loads((out / "cost.json").read_text())
        p, d = c["prefill_s"], c["decode_ms_per_token"]
        lines += [f"## Cost ({c['length']}-token prefill, ratio {c['ratio']}, best of {c['repeats']}, "
                  f"{c['threads']} thread(s), CPU)", "",
                  "| | full | fastkvzip | kvzip |", "|---|---:|---:|---:|",
                  f"| prefill (s) | {p['full']:.2f} | {p['fastkvzip']:.2f} | {p['kvzip']:.2f} |",
                  f"| prefill vs full | 1.00x | {p['fastkvzip'] / p['full']:.2f}x | {p['kvzip'] / p['full']:.2f}x |",
                  f"| decode (ms/token) | {d['full']:.1f} | {d['fastkvzip']:.1f} | |", "",
                  f"The gates alone on {c['length']} tokens: {c['gates_alone_s']:.3f} s "
                  f"({100 * c['gates_alone_s'] / p['full']:.2f}% of the full prefill); "
                  f"{c['gate_parameters']:,} gate parameters.", ""]
    summary = out / "eval" / "summary.md"
    if summary.is_file():
        lines += ["## Quality (evaluation harness)", "", summary.read_text().split("\n", 1)[1].strip(), ""]
    text = "\n".join(lines)
    (out / "summary.md").write_text(text)
    return text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--gates", help="gate checkpoint folder (default: the shipped gates)")
    parser.add_argument("--out", default=None, help="default: results/fastkvzip/<model>")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--heldout-tokens", type=int, default=2000, help="tokens per held-out essay")
    parser.add_argument("--cost-length", type=int, default=4096)
    parser.add_argument("--cost-repeats", type=int, default=1)
    parser.add_argument("--samples", type=int, default=10)
    parser.add_argument("--context-length", type=int, default=4096)
    parser.add_argument("--tasks", default="niah_single,qa,fidelity")
    parser.add_argument("--policies", default="fastkvzip,kvzip,snapkv,h2o")
    parser.add_argument("--ratios", default="0,0.5,0.7,0.8")
    parser.add_argument("--skip", default="", help="comma-separated parts to skip: heldout, cost, eval")
    args = parser.parse_args()
    out = Path(args.out or f"results/fastkvzip/{args.model}")
    out.mkdir(parents=True, exist_ok=True)
    skip = {s.strip() for s in args.skip.split(",") if s.strip()}
    model, tok = kvevict.load_model(args.model, dtype=args.dtype)
    folder = Path(args.gates) if args.gates else shipped_gates(KIND, args.model)
    if "heldout" not in skip:
        result = heldout(model, tok, folder, args.heldout_tokens)
        (out / "heldout.json").write_text(json.dumps(result, indent=2))
        print(json.dumps(result, indent=2))
    if "cost" not in skip:
        result = cost(model, tok, folder, args.cost_length, 0.7, 32, args.cost_repeats)
        (out / "cost.json").write_text(json.dumps(result, indent=2))
        print(json.dumps(result, indent=2))
    if "eval" not in skip:
        cfg = EvalConfig(model=args.model, policies=args.policies.split(","),
                         ratios=[float(r) for r in args.ratios.split(",")], tasks=args.tasks.split(","),
                         context_length=args.context_length, samples=args.samples, out=str(out / "eval"),
                         dtype=args.dtype, policy_args={"fastkvzip": {"gates": str(folder)}} if args.gates else {})
        run_eval(cfg, model=model, tokenizer=tok)
    print(write_summary(out, args.model))


if __name__ == "__main__":
    main()
