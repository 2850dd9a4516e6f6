"""Where do kept tokens sit? The positional bias AhaKV (arXiv 2506.03762) is built on, measured.

For each model and a few ~4k-token essay prompts, one prefill is observed and then evicted to a budget of 25% of
the prompt (tokens per layer and KV head) under h2o (half of the budget a recent window, the paper's split), h2o
with recent_fraction=0 (pure accumulated attention), AhaKV and each single-part ablation (-RA, -SG, -VPE).
Reported per variant, over every evictable layer and KV head: the fraction of kept tokens in the second half of
the context, the fraction in its first 10%, the second-half fraction among the tokens chosen by score (outside
the protected recent window) and the mean kept position / context length.

    python benchmarks/ahakv_position_bias.py            # smollm2-135m and gemma3-270m, 3 prompts each

Writes results/ahakv/position_bias.json, position_bias.md and position_bias_<model>.png.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import time
from pathlib import Path

import torch
import transformers

import kvevict
from kvevict.data import haystack
from kvevict.profiling import bias_stats, plot_position_histograms, position_bias

STATS = ("second_half", "first_tenth", "second_half_scored", "mean_position")
BINS = 40


def measure_model(name: str, prompts: int, tokens: int, fraction: float, offsets_step: int) -> dict:
    model, tok = kvevict.load_model(name)
    config = model.config.get_text_config(decoder=True)
    per_prompt, relative = [], {}
    for i in range(prompts):
        offset = i * offsets_step  # different essays first: distinct haystacks
        prompt = haystack(tok, tokens, offset=offset)
        n = len(tok(prompt).input_ids)
        budget = math.ceil(fraction * n)
        start = time.perf_counter()
        with torch.no_grad():
            result = position_bias(model, tok, prompt, kvevict.make_policy("ahakv", budget=budget), budget)
        seconds = time.perf_counter() - start
        entries = len(result["layers"]) * config.num_key_value_heads
        stats = {}
        for label, v in result["variants"].items():
            stats[label] = bias_stats(v["positions"], n, v["window"], entries)
            relative.setdefault(label, []).append(v["positions"].double() / n)
        per_prompt.append({"offset": offset, "tokens": n, "budget": budget, "seconds": round(seconds, 1),
                           "variants": stats})
        print(f"{name} prompt {i} (offset {offset}, {n} tokens, budget {budget}): "
              + ", ".join(f"{k} {s['second_half']:.3f}" for k, s in stats.items()), flush=True)
    labels = list(per_prompt[0]["variants"])
    summary = {}
    for label in labels:
        values = {s: [p["variants"][label][s] for p in per_prompt] for s in STATS}
        pooled = torch.cat(relative[label])
        counts = torch.histc(pooled, bins=BINS, min=0.0, max=1.0)
        summary[label] = {
            **{s: sum(v) / len(v) for s, v in values.items()},
            "second_half_min": min(values["second_half"]), "second_half_max": max(values["second_half"]),
            "kept_per_head": per_prompt[0]["variants"][label]["kept_per_head"],
            "histogram": (counts / counts.sum()).tolist(),
        }
    relative = {label: torch.cat(parts) for label, parts in relative.items()}
    return {
        "model": name, "evictable_layers": len(result["layers"]), "kv_heads": config.num_key_value_heads,
        "layers": config.num_hidden_layers, "per_prompt": per_prompt, "summary": summary, "_relative": relative,
        "_windows": {label: v["window"] for label, v in result["variants"].items()},
    }


def markdown(results: list[dict], args) -> str:
    lines = [
        "# Kept-token positions: h2o vs AhaKV (arXiv 2506.03762)",
        "",
        f"Budget: {args.fraction:.0%} of each prompt, tokens per layer and KV head; {args.prompts} essay prompts of "
        f"~{args.tokens} tokens per model (`haystack(tok, {args.tokens}, offset=i*{args.offset_step})`). Counts run "
        "over every evictable layer and KV head. A uniform spread puts 0.500 of the kept tokens in the second half.",
        "",
        "- **2nd half**: fraction of kept tokens in the second half of the context (mean over prompts; min-max).",
        "- **first 10%**: fraction of kept tokens in the first tenth of the context.",
        "- **2nd half, scored**: second-half fraction among tokens chosen by score, i.e. outside the variant's "
        "protected recent window (h2o: budget/2 tokens; ahakv: 32; h2o recent_fraction=0: none).",
        "- **mean pos**: mean kept position / context length.",
        "",
    ]
    for res in results:
        lines += [
            f"## {res['model']} ({res['evictable_layers']} evictable of {res['layers']} layers, "
            f"{res['kv_heads']} KV head(s))",
            "",
            "| variant | kept/head | 2nd half | (min-max) | first 10% | 2nd half, scored | mean pos |",
            "|---|---:|---:|---:|---:|---:|---:|",
        ]
        for label, s in res["summary"].items():
            lines.append(f"| {label} | {s['kept_per_head']:.0f} | {s['second_half']:.3f} | "
                         f"{s['second_half_min']:.3f}-{s['second_half_max']:.3f} | {s['first_tenth']:.3f} | "
                         f"{s['second_half_scored']:.3f} | {s['mean_position']:.3f} |")
        lines += ["", f"![kept positions]({Path(res['picture']).name})", ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["smollm2-135m", "gemma3-270m"])
    parser.add_argument("--prompts", type=int, default=3)
    parser.add_argument("--tokens", type=int, default=4000)
    parser.add_argument("--fraction", type=float, default=0.25, help="budget as a fraction of the prompt")
    parser.add_argument("--offset-step", type=int, default=16, help="essays skipped between prompts")
    parser.add_argument("--out", default="results/ahakv")
    args = parser.parse_args()
    if not 0 < args.fraction < 1:
        raise SystemExit(f"--fraction must be in (0, 1), got {args.fraction}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results = []
    for name in args.models:
        res = measure_model(name, args.prompts, args.tokens, args.fraction, args.offset_step)
        picture = out / f"position_bias_{name}.png"
        budget = res["per_prompt"][0]["budget"]
        tokens = res["per_prompt"][0]["tokens"]
        plot_position_histograms(res.pop("_relative"), picture,
                                 f"{name}: kept positions, {args.prompts} prompts of ~{args.tokens} tokens, "
                                 f"budget {args.fraction:.0%} (~{budget} tokens per head)",
                                 protected={k: w / tokens for k, w in res.pop("_windows").items()})
        res["picture"] = str(picture)
        results.append(res)
    meta = {"torch": torch.__version__, "transformers": transformers.__version__, "machine": platform.machine(),
            "threads": torch.get_num_threads(), "args": vars(args)}
    (out / "position_bias.json").write_text(json.dumps({"meta": meta, "results": results}, indent=1))
    (out / "position_bias.md").write_text(markdown(results, args))
    print(markdown(results, args))


if __name__ == "__main__":
    main()
