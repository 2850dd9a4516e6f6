"""Attention-Gate on a real model: achieved eviction ratio on held-out text, runtime overhead, and quality against
StreamingLLM, H2O and SnapKV at the achieved ratio (through the evaluation harness).

    python benchmarks/attention_gate_eval.py --model smollm2-135m --out results/attention_gate

Writes under --out: heldout_ratio.json (per source: the fraction of KV pairs the cache evicted on held-out
documents, and the in-context perplexity with and without the gates), heldout_kl.json (continuation KL to the full
cache on held-out documents, the gates against the baselines at the achieved ratio), overhead.json (prefill and
decode time with and without the gates, and the gates alone), train_step.json (ms per training step, before and
after the fused flagged attention and bfloat16 autocast), eval/ (the harness's sweep: summary.csv, summary.md,
per-run files), training_curve.png (held-out loss of the shipped checkpoints during training) and summary.md.
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
from kvevict.gates.attention_gate import load_attention_gates, resolve_gates_dir, shipped_targets
from kvevict.train.attention_gate import Corpus


def heldout_windows(tok, meta: dict, length: int, per_source: int, seed: int):
    """(source, ids [length]) for `per_source` random windows of each corpus's documents held out of the gates'
    training (the checkpoint's `held_out_every`); the same windows for the same arguments."""
    every = meta.get("training", {}).get("config", {}).get("held_out_every", 10)
    corpus = Corpus(tok, held_out_every=every, max_tokens_per_source=4 * length * per_source)
    for source in corpus.sources:
        stream = corpus.held_out[source]
        g = torch.Generator().manual_seed(seed)
        for _ in range(per_source):
            start = int(torch.randint(max(1, len(stream) - length), (1,), generator=g))
            yield source, stream[start : start + length]


def heldout_ratio(model, tok, gates_dir: Path, length: int, windows_per_source: int, seed: int) -> dict:
    """Per source: evicted fraction of the gated layers' KV entries after a prefill of `length` held-out tokens, and
    perplexity."""
    config, gates, meta = load_attention_gates(gates_dir, model)
    gated = [int(layer) for layer in meta["layers"]]
    rows: dict[str, list[dict]] = {}
    all_kept, all_total = 0, 0
    for source, window in heldout_windows(tok, meta, length, windows_per_source, seed):
        ids = window.unsqueeze(0)
        cache = kvevict.EvictingCache(model, kvevict.make_policy("attention-gate", gates=str(gates_dir)))
        with torch.no_grad():
            logits = model(input_ids=ids, **cache_kwargs(cache)).logits
            gated_nll = torch.nn.functional.cross_entropy(logits[0, :-1].float(), ids[0, 1:]).item()
            full_logits = model(input_ids=ids).logits  # no cache: the model's own attention
            full_nll = torch.nn.functional.cross_entropy(full_logits[0, :-1].float(), ids[0, 1:]).item()
        counts = cache.kept_counts()[gated].double()  # [gated layers, 1, heads]: gemma3's sliding ones are not
        per_layer = 1.0 - counts.mean(dim=(1, 2)) / ids.shape[1]
        rows.setdefault(source, []).append({
            "evicted": 1.0 - float(counts.mean()) / ids.shape[1], "bytes_saved": cache.compression(),
            "layer_min": float(per_layer.min()), "layer_max": float(per_layer.max()),
            "ppl_gated": float(torch.tensor(gated_nll).exp()), "ppl_full": float(torch.tensor(full_nll).exp())})
        all_kept += float(counts.sum())
        all_total += counts.numel() * ids.shape[1]
    sources = {source: {k: sum(r[k] for r in rs) / len(rs) for k in rs[0]} for source, rs in rows.items()}
    return {"target_ratio": config.target_ratio, "length": length, "sources": sources,
            "evicted": 1.0 - all_kept / all_total}


def heldout_fidelity(model, tok, gates_dir: Path, ratio: float, baselines: list[str], length: int,
                     windows_per_source: int, continuation: int, seed: int) -> dict:
    """Continuation KL to the full cache on documents held out of the gates' training: each window's first
    `length - continuation` tokens are compressed (by the gates in-context, or by a baseline at the same ratio),
    then its last `continuation` tokens are teacher-forced (the harness's fidelity measure, on held-out text)."""
    from kvevict.eval.runner import Run, SampleEvaluator
    from kvevict.eval.tasks import Sample

    _, _, meta = load_attention_gates(gates_dir, model)
    cfg = EvalConfig(model="", policies=[], ratios=[], tasks=["fidelity"],
                     policy_args={"attention-gate": {"gates": str(gates_dir)}})
    runs = [Run("fidelity", "full", 0.0), Run("fidelity", "attention-gate", ratio),
            *(Run("fidelity", name, ratio) for name in baselines)]
    evaluator = SampleEvaluator(model, tok, cfg, runs)
    rows = {run.policy: [] for run in runs}
    for i, (source, window) in enumerate(heldout_windows(tok, meta, length, windows_per_source, seed)):
        ids = window.tolist()
        sample = Sample("fidelity", i, context_ids=ids[: length - continuation],
                        continuation_ids=ids[length - continuation :], meta={"source": source})
        for run, row in evaluator(sample).items():
            rows[run.policy].append({"source": source, "kl": row["kl"], "top1": row["top1"],
                                     "ppl_ratio": row["ppl_ratio"],
                                     "kv_fraction": row["kv_bytes"] / row["full_bytes"]})
    mean = {name: {k: sum(r[k] for r in rs) / len(rs) for k in ("kl", "top1", "ppl_ratio", "kv_fraction")}
            for name, rs in rows.items()}
    return {"ratio": ratio, "length": length, "continuation": continuation, "windows": len(rows["full"]),
            "mean": mean, "per_window": rows}


def overhead(model, tok, gates_dir: Path, length: int, decode: int, repeats: int) -> dict:
    """Seconds for a prefill of `length` tokens and ms per decoded token, full cache vs attention-gate (runs
    alternated, so both see the same load on a shared machine; medians, wall clock and this process's CPU time),
    and the gates alone on the same hidden states."""
    import statistics

    text = " ".join(t for _, t in kvevict.data.essays())
    ids = tok(text, return_tensors="pt").input_ids[:, :length]

    def run(policy_name):
        policy = kvevict.make_policy(policy_name, **({"gates": str(gates_dir)} if policy_name != "full" else {}))
        cache = kvevict.EvictingCache(model, policy)
        with torch.no_grad():
            t0 = time.perf_counter()
            out = model(input_ids=ids, **cache_kwargs(cache))
            t1 = time.perf_counter()
            nxt = out.logits[:, -1:].argmax(-1)
            nxt = model(input_ids=nxt, **cache_kwargs(cache)).logits[:, -1:].argmax(-1)  # first step: warm-up
            t2, c2 = time.perf_counter(), time.process_time()
            for _ in range(decode):
                nxt = model(input_ids=nxt, **cache_kwargs(cache)).logits[:, -1:].argmax(-1)
            t3, c3 = time.perf_counter(), time.process_time()
        return t1 - t0, (t3 - t2) / decode, (c3 - c2) / decode

    runs = {"full": [], "attention-gate": []}
    for _ in range(repeats):
        for name, rows in runs.items():
            rows.append(run(name))
    median = {name: [statistics.median(r[i] for r in rows) for i in range(3)] for name, rows in runs.items()}
    full, gated = median["full"], median["attention-gate"]
    config, gates, _ = load_attention_gates(gates_dir, model)
    hidden = torch.randn(1, length, model.config.hidden_size)
    best = float("inf")
    with torch.no_grad():
        for _ in range(repeats):
            t0 = time.perf_counter()
            for gate in gates.values():
                gate(hidden)
            best = min(best, time.perf_counter() - t0)
    params = sum(p.numel() for p in gates.parameters())
    return {"length": length, "decode_tokens": decode, "repeats": repeats,
            "prefill_s": {"full": full[0], "attention-gate": gated[0]},
            "decode_ms_per_token": {"full": 1e3 * full[1], "attention-gate": 1e3 * gated[1]},
            "decode_cpu_ms_per_token": {"full": 1e3 * full[2], "attention-gate": 1e3 * gated[2]},
            "decode_ratio": gated[1] / full[1], "decode_cpu_ratio": gated[2] / full[2],
            "decode_ms_per_token_each_run": {name: [1e3 * r[1] for r in rows] for name, rows in runs.items()},
            "gates_alone_prefill_s": best, "gate_parameters": params,
            "model_parameters": sum(p.numel() for p in model.parameters()),
            "gate_state_bytes_per_row": len(gates) * (config.window - 1) * config.heads * config.head_dim * 2 * 4,
            "threads": torch.get_num_threads()}


def train_step(model, tok, gates_dir: Path, batch: int, seq_len: int, repeats: int) -> dict:
    """ms per Attention-Gate training step (forward, backward, optimizer), the variants alternated step by step:
    the flagged attention written out ("eager", the implementation before the fused one) or fused (SDPA forward,
    blocked backward), the model's products in float32 or under bfloat16 autocast."""
    import statistics

    from transformers import AttentionInterface

    from kvevict.gates import attention_gate as ag
    from kvevict.train.attention_gate import gated_step

    config, _, _ = load_attention_gates(gates_dir, model)
    for p in model.parameters():
        p.requires_grad_(False)
    gates = ag.build_gates(model, config, seed=0).train()
    optimizer = torch.optim.AdamW(gates.parameters(), lr=1e-4)
    text = " ".join(t for _, t in kvevict.data.essays())
    ids = tok(text, return_tensors="pt").input_ids[0, : batch * seq_len].view(batch, seq_len)
    variants = {"eager attention, float32 (before)": (ag.flagged_attention_eager, "none"),
                "fused attention, float32": (ag.flagged_attention, "none"),
                "fused attention, bfloat16 autocast (after)": (ag.flagged_attention, "bfloat16")}
    ag.register_training_attention()
    wall = {name: [] for name in variants}
    cpu = {name: [] for name in variants}
    try:
        for rep in range(repeats + 1):  # the first round warms up
            for name, (attention, autocast) in variants.items():
                AttentionInterface.register(ag.TRAINING_ATTENTION, attention)
                t0, c0 = time.perf_counter(), time.process_time()
                result = gated_step(model, gates, config, ids, seq_len // 4, config.target_ratio, 10.0,
                                    autocast=autocast)
                optimizer.zero_grad(set_to_none=True)
                result["loss"].backward()
                optimizer.step()
                if rep:
                    wall[name].append(time.perf_counter() - t0)
                    cpu[name].append(time.process_time() - c0)
    finally:
        AttentionInterface.register(ag.TRAINING_ATTENTION, ag.flagged_attention)
    before = statistics.median(wall["eager attention, float32 (before)"])
    return {"batch": batch, "seq_len": seq_len, "repeats": repeats, "threads": torch.get_num_threads(),
            "ms_per_step": {n: 1e3 * statistics.median(t) for n, t in wall.items()},
            "cpu_ms_per_step": {n: 1e3 * statistics.median(t) for n, t in cpu.items()},
            "speedup": {n: before / statistics.median(t) for n, t in wall.items()},
            "ms_each_step": {n: [round(1e3 * x) for x in t] for n, t in wall.items()}}


def plot_training(folders: dict[float, Path], path: Path) -> None:
    """Held-out LM loss against training tokens for each checkpoint (target ratio -> folder), from gates.json."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    full = None
    for target, folder in sorted(folders.items()):
        record = json.loads((folder / "gates.json").read_text()).get("training", {})
        if not record.get("history"):  # gates saved without a training record: nothing to plot
            continue
        per_step = record["config"]["batch_size"] * record["config"]["seq_len"]
        history = record["history"]
        ax.plot([h["step"] * per_step for h in history], [h["val_loss"] for h in history], marker=".",
                label=f"gates, target {target:g} ({record['steps']:,} steps)")
        full = history[-1]["full_val_loss"]
    if full is not None:
        ax.axhline(full, color="black", linestyle="--", linewidth=1, label="full cache")
    ax.set_xlabel("training tokens")
    ax.set_ylabel("held-out LM loss (in-context eviction)")
    ax.set_title("Attention-Gate training, held-out validation")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_summary(out: Path) -> str:
    """summary.md from whatever parts exist under `out`."""
    import csv

    lines = ["# Attention-Gate: held-out ratio, overhead, quality vs training-free baselines", ""]
    if (out / "training_curve.png").is_file():
        lines += ["![held-out loss during training](training_curve.png)", ""]
    if (out / "heldout_ratio.json").is_file():
        held = json.loads((out / "heldout_ratio.json").read_text())
        lines += [f"## Achieved eviction on held-out text ({held['length']}-token prefills, target {held['target_ratio']})",
                  "", "| source | evicted KV pairs | per-layer min..max | ppl with gates (in-context) | ppl full |",
                  "|---|---:|---:|---:|---:|"]
        for source, r in held["sources"].items():
            lines.append(f"| {source} | {r['evicted']:.3f} | {r['layer_min']:.2f}..{r['layer_max']:.2f} | "
                         f"{r['ppl_gated']:.2f} | {r['ppl_full']:.2f} |")
        lines += [f"| all | {held['evicted']:.3f} | | | |", ""]
    if (out / "heldout_kl.json").is_file():
        kl = json.loads((out / "heldout_kl.json").read_text())
        lines += [(f"## Continuation fidelity on held-out documents ({kl['windows']} windows of {kl['length']} "
                   f"tokens, the last {kl['continuation']} teacher-forced; baselines at ratio {kl['ratio']:g})"), "",
                  "| policy | KL to full cache | top-1 agreement | perplexity / full cache's | KV bytes kept |",
                  "|---|---:|---:|---:|---:|"]
        for name, m in kl["mean"].items():
            ppl = f"{m['ppl_ratio']:.3f}" if "ppl_ratio" in m else ""
            lines.append(f"| {name} | {m['kl']:.4f} | {m['top1']:.3f} | {ppl} | {m['kv_fraction']:.3f} |")
        lines.append("")
    if (out / "overhead.json").is_file():
        o = json.loads((out / "overhead.json").read_text())
        lines += [(f"## Runtime ({o['length']}-token prefill, {o['decode_tokens']} decoded tokens, median of "
                   f"{o['repeats']} alternated runs, {o['threads']} threads)"), "",
                  "| | full cache | attention-gate |", "|---|---:|---:|",
                  f"| prefill (s) | {o['prefill_s']['full']:.2f} | {o['prefill_s']['attention-gate']:.2f} |",
                  (f"| decode (ms/token) | {o['decode_ms_per_token']['full']:.1f} | "
                   f"{o['decode_ms_per_token']['attention-gate']:.1f} ({o['decode_ratio']:.2f}x) |"),
                  (f"| decode, CPU time (ms/token) | {o['decode_cpu_ms_per_token']['full']:.1f} | "
                   f"{o['decode_cpu_ms_per_token']['attention-gate']:.1f} ({o['decode_cpu_ratio']:.2f}x) |"), "",
                  (f"The gates alone on {o['length']} tokens (all layers): {o['gates_alone_prefill_s']:.2f} s. "
                   f"Gate parameters: {o['gate_parameters']:,} "
                   f"({100 * o['gate_parameters'] / o['model_parameters']:.2f}% of the model); gate state while "
                   f"decoding: {o['gate_state_bytes_per_row'] / 2**20:.2f} MiB per batch row."), ""]
    if (out / "train_step.json").is_file():
        t = json.loads((out / "train_step.json").read_text())
        lines += [(f"## Training step ({t['batch']} x {t['seq_len']} tokens, median of {t['repeats']}, variants "
                   f"alternated, {t['threads']} threads)"), "",
                  "| implementation | ms per step | CPU ms per step | speed-up |", "|---|---:|---:|---:|"]
        for name, ms in t["ms_per_step"].items():
            lines.append(f"| {name} | {ms:,.0f} | {t['cpu_ms_per_step'][name]:,.0f} | {t['speedup'][name]:.2f}x |")
        lines.append("")
    summary = out / "eval" / "summary.csv"
    if summary.is_file():
        with open(summary) as f:
            rows = list(csv.DictReader(f))
        metrics = sorted({k for r in rows for k in r if k.startswith("mean_") and r[k]})
        lines += ["## Quality at the achieved ratio (evaluation harness)", "",
                  "| task | policy | ratio | score | kv_fraction | " + " | ".join(metrics) + " |",
                  "|---|---|---:|---:|---:|" + "---:|" * len(metrics)]
        for r in rows:
            values = " | ".join(f"{float(r[m]):.4g}" if r.get(m) else "" for m in metrics)
            lines.append(f"| {r['task']} | {r['policy']} | {float(r['ratio']):g} | {float(r['score']):.2f} | "
                         f"{float(r['kv_fraction']):.3f} | {values} |")
        lines.append("")
    text = "\n".join(lines)
    (out / "summary.md").write_text(text)
    return text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--gates", help="gate checkpoint folder (default: the shipped gates)")
    parser.add_argument("--out", default="results/attention_gate")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--heldout-length", type=int, default=2048)
    parser.add_argument("--heldout-windows", type=int, default=1, help="windows per source")
    parser.add_argument("--samples", type=int, default=10)
    parser.add_argument("--context-length", type=int, default=2048)
    parser.add_argument("--tasks", default="fidelity,niah_single")
    parser.add_argument("--baselines", default="streamingllm,h2o,snapkv")
    parser.add_argument("--ratio", type=float, help="ratio for the comparison (default: achieved on held-out text)")
    parser.add_argument("--overhead-repeats", type=int, default=3)
    parser.add_argument("--decode-tokens", type=int, default=16)
    parser.add_argument("--step-repeats", type=int, default=3, help="training steps per variant (train-step part)")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    parser.add_argument("--skip", default="",
                        help="comma-separated parts to skip: heldout, heldout-kl, overhead, train-step, eval")
    parser.add_argument("--kl-windows", type=int, default=5, help="held-out windows per source (heldout-kl part)")
    parser.add_argument("--kl-continuation", type=int, default=128,
                        help="last tokens of each held-out window teacher-forced (heldout-kl part)")
    args = parser.parse_args()
    if not 0 < args.kl_continuation < args.heldout_length:
        parser.error("--kl-continuation must be at least 1 and shorter than --heldout-length")
    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    skip = {s.strip() for s in args.skip.split(",") if s.strip()}
    model, tok = kvevict.load_model(args.model, dtype=args.dtype)
    gates_dir = resolve_gates_dir(args.gates, model)
    target = float(json.loads((gates_dir / "gates.json").read_text())["hyper"]["target_ratio"])
    plot_training({**shipped_targets(args.model), target: gates_dir}, out / "training_curve.png")

    if "heldout" not in skip:
        t0 = time.perf_counter()
        held = heldout_ratio(model, tok, gates_dir, args.heldout_length, args.heldout_windows, seed=0)
        held["seconds"] = time.perf_counter() - t0
        (out / "heldout_ratio.json").write_text(json.dumps(held, indent=2))
        print(json.dumps(held, indent=2))
    if "heldout-kl" not in skip:
        held = json.loads((out / "heldout_ratio.json").read_text())
        ratio = args.ratio if args.ratio is not None else round(held["evicted"], 2)
        t0 = time.perf_counter()
        kl = heldout_fidelity(model, tok, gates_dir, ratio, args.baselines.split(","), args.heldout_length,
                              args.kl_windows, args.kl_continuation, seed=1)
        kl["seconds"] = time.perf_counter() - t0
        (out / "heldout_kl.json").write_text(json.dumps(kl, indent=2))
        print(json.dumps(kl["mean"], indent=2))
    if "overhead" not in skip:
        over = overhead(model, tok, gates_dir, 2048, args.decode_tokens, args.overhead_repeats)
        (out / "overhead.json").write_text(json.dumps(over, indent=2))
        print(json.dumps(over, indent=2))
    if "train-step" not in skip:
        steps = train_step(model, tok, gates_dir, 2, 256, args.step_repeats)
        (out / "train_step.json").write_text(json.dumps(steps, indent=2))
        print(json.dumps(steps, indent=2))
    if "eval" in skip:
        print(write_summary(out))
        return
    held = json.loads((out / "heldout_ratio.json").read_text())
    ratio = args.ratio if args.ratio is not None else round(held["evicted"], 2)
    if "eval" not in skip:
        cfg = EvalConfig(model=args.model, policies=["attention-gate", *args.baselines.split(",")], ratios=[0.0, ratio],
                         tasks=args.tasks.split(","), context_length=args.context_length, samples=args.samples,
                         out=str(out / "eval"), dtype=args.dtype,
                         policy_args={"attention-gate": {"gates": str(gates_dir)}} if args.gates else {})
        t0 = time.perf_counter()
        run_eval(cfg, model=model, tokenizer=tok)
        print(f"eval took {time.perf_counter() - t0:.0f} s")
        print((out / "eval" / "summary.md").read_text())
    print(write_summary(out))


if __name__ == "__main__":
    main()
