"""KVzip's scores in the model's precision vs float32: what changes in the kept sets, and what it saves.

For `--prompts` essay prompts of `--length` tokens (bfloat16 model, ratio `--ratio`), one KVzip prefill and
eviction with `score_precision="model"` and one with "float32", then a plain prefill (the `full` policy), the three
alternated `--repeats` times. Reports the share of kept (layer, KV head, position) entries found in only one of the
two kept sets, and each precision's time as a ratio to the plain one's, best of the repeats per prompt (each time
covers the prefill, with KVzip's repeat passes and scoring, the eviction and the reading of the kept sets).

    python benchmarks/kvzip_score_precision.py --model smollm2-135m --threads 2 \\
        --out results/kvzip/score_precision_smollm2-135m.json
"""

from __future__ import annotations

import json
import time

import torch

import kvevict
from kvevict.data import haystack

from fastkvzip_gate_precision import kept_sets, precision_args  # this folder is on sys.path

PRECISIONS = ("model", "float32")


def main() -> None:
    args = precision_args(__doc__.splitlines()[0], repeats=2)
    model, tok = kvevict.load_model(args.model, dtype="bfloat16")
    policies = {p: kvevict.make_policy("kvzip", compression_ratio=args.ratio, score_precision=p, tokenizer=tok)
                for p in PRECISIONS}
    full = kvevict.make_policy("full")
    prompts = []
    for i in range(args.prompts):
        ids = tok(haystack(tok, args.length, offset=5 * i), return_tensors="pt").input_ids
        seconds = {p: [] for p in (*PRECISIONS, "plain")}
        sets = {}
        for _ in range(args.repeats):
            for name, policy in (*policies.items(), ("plain", full)):
                t0 = time.perf_counter()
                kept = kept_sets(model, ids, policy)
                seconds[name].append(time.perf_counter() - t0)
                sets.setdefault(name, kept)
        kept = sum(len(s) for s in sets["float32"])
        differ = sum(len(a ^ b) for a, b in zip(sets["model"], sets["float32"]))
        best = {name: min(s) for name, s in seconds.items()}
        ratio = {p: best[p] / best["plain"] for p in PRECISIONS}
        prompts.append({"tokens": ids.shape[1], "kept": kept, "in_one_set_only": differ, "share": differ / kept,
                        "seconds_best": best, "ratio_to_plain": ratio})
        print(f"prompt {i}: {ids.shape[1]} tokens, {kept} kept entries, {differ} in one set only "
              f"({differ / kept:.3%}); plain {best['plain']:.2f} s, model precision {ratio['model']:.2f}x, "
              f"float32 {ratio['float32']:.2f}x", flush=True)
    result = {"model": args.model, "length": args.length, "ratio": args.ratio, "threads": torch.get_num_threads(),
              "repeats": args.repeats, "prompts": prompts}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
