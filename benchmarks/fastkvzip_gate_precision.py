"""Fast KVzip gates in the model's precision vs float32: what changes in the kept sets, and what it saves.

For `--prompts` essay prompts of `--length` tokens (bfloat16 model, ratio `--ratio`), one prefill and eviction
with `gate_precision="model"` and one with "float32"; the share of kept (layer, KV head, position) entries found in
only one of the two kept sets. Then one gate on `--length` random hidden states in the model's dtype, both
precisions alternated, median of `--repeats` calls.

    python benchmarks/fastkvzip_gate_precision.py --model smollm2-135m --threads 2 \
        --out results/fastkvzip/gate_precision_smollm2-135m.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

import kvevict
from kvevict.compat import cache_kwargs
from kvevict.data import haystack
from kvevict.gates.checkpoint import shipped_gates
from kvevict.gates.sink_gate import load_gates


def kept_sets(model, ids, policy) -> list[set]:
    """The (layer, KV head, position) entries `policy` keeps after one prefill of `ids` and an eviction."""
    cache = kvevict.EvictingCache(model, policy)
    with torch.no_grad():
        model(input_ids=ids, **cache_kwargs(cache), logits_to_keep=1)
        cache.evict()
    return [{(layer, head, int(p)) for head, positions in enumerate(cache.kept_positions(layer)[0])
             for p in positions} for layer in range(len(cache.layers))]


def precision_args(description: str, repeats: int) -> argparse.Namespace:
    """The options of a precision comparison (this script's and kvzip_score_precision.py's), checked; sets the
    thread count."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--length", type=int, default=4000)
    parser.add_argument("--ratio", type=float, default=0.7)
    parser.add_argument("--prompts", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=repeats)
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    for name in ("length", "prompts", "repeats"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be >= 1")
    if not 0 < args.ratio < 1:
        parser.error("--ratio must be in (0, 1)")
    if args.threads:
        torch.set_num_threads(args.threads)
    return args


def main() -> None:
    args = precision_args(__doc__.splitlines()[0], repeats=15)
    model, tok = kvevict.load_model(args.model, dtype="bfloat16")
    prompts = []
    for i in range(args.prompts):
        ids = tok(haystack(tok, args.length, offset=5 * i), return_tensors="pt").input_ids
        sets = {p: kept_sets(model, ids, kvevict.make_policy("fastkvzip", compression_ratio=args.ratio,
                                                              gate_precision=p)) for p in ("model", "float32")}
        kept = sum(len(s) for s in sets["float32"])
        differ = sum(len(a ^ b) for a, b in zip(sets["model"], sets["float32"]))
        prompts.append({"tokens": ids.shape[1], "kept": kept, "in_one_set_only": differ, "share": differ / kept})
        print(f"prompt {i}: {ids.shape[1]} tokens, {kept} kept entries, {differ} in one set only "
              f"({differ / kept:.3%})", flush=True)
    _, gates = load_gates(shipped_gates("fastkvzip", args.model), model)
    gate = next(iter(gates.values()))
    hidden = torch.randn(1, args.length, model.config.hidden_size, dtype=torch.bfloat16)
    times = {"model": [], "float32": []}
    with torch.no_grad():
        for rep in range(args.repeats + 1):  # the first round warms up
            for precision in times:
                t0 = time.perf_counter()
                gate(hidden, model_precision=precision == "model")
                if rep:
                    times[precision].append(time.perf_counter() - t0)
    gate_ms = {p: 1e3 * statistics.median(t) for p, t in times.items()}
    print(f"one gate on {args.length} tokens: model precision {gate_ms['model']:.2f} ms, "
          f"float32 {gate_ms['float32']:.2f} ms", flush=True)
    result = {"model": args.model, "length": args.length, "ratio": args.ratio, "threads": torch.get_num_threads(),
              "prompts": prompts, "gate_ms_median": gate_ms, "repeats": args.repeats}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
