"""Reconstruction vs continuation: what KVzip's kept sets (and the Fast KVzip gates imitating them) preserve.

KVzip ranks a context's KV pairs by how much the model attends to them when asked to repeat the context. This
script asks both questions of every compressed cache, on the harness's fidelity samples (essays, `--length`
tokens, the last `--continuation` teacher-forced):
- continuation: KL of the next-token distributions to the full cache's on the teacher-forced continuation (and
  top-1 agreement), the harness's fidelity measure;
- reconstruction: the mean negative log-likelihood of the whole context, teacher-forced after KVzip's own repeat
  prompt ("Repeat the previous context exactly." + the assistant prefix): how well the kept pairs let the model
  copy the context back (KVzip's objective), also per quarter of the context;
- where the kept pairs sit: per evictable layer, the share of its entries kept over the whole context and over
  its last 1,024 tokens.

    python benchmarks/kvzip_reconstruction.py --model gemma3-270m --threads 2 --out results/kvzip/reconstruction_gemma3-270m.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

import kvevict
from kvevict.api import prefill
from kvevict.cache import EvictingCache
from kvevict.compat import cache_kwargs
from kvevict.eval.metrics import fidelity_metrics
from kvevict.eval.tasks import fidelity
from kvevict.policies.kvzip import FIRST_PROMPT, assistant_prefix

RECENT = 1024  # the "last tokens" span of the kept-share column


def teacher_forced(model, cache, ids: torch.Tensor) -> torch.Tensor:
    """Logits [T, V] (float32) of ids [1, T] on top of the cache, which keeps nothing of them."""
    mask = torch.ones(1, cache.seen + ids.shape[1], dtype=torch.long)
    with torch.no_grad(), cache.frozen_tokens():
        return model(input_ids=ids, attention_mask=mask, **cache_kwargs(cache)).logits[0].float()


def copy_nll(model, cache, prompt: list[int], copied: list[int]) -> list[float]:
    """Mean NLL of `copied` teacher-forced after `prompt`, per quarter of `copied`."""
    ids = torch.tensor([prompt + copied])
    logits = teacher_forced(model, cache, ids)[len(prompt) - 1:-1]
    nll = -torch.log_softmax(logits, -1).gather(-1, torch.tensor(copied).view(-1, 1)).view(-1)
    return [float(q.mean()) for q in nll.chunk(4)]


def kept_shares(cache, context_len: int) -> dict[int, tuple[float, float]]:
    """Per evictable layer: (share of the context kept, share of its last RECENT tokens kept), batch row 0."""
    shares = {}
    for layer in cache.layers:
        if not layer.evictable or layer.store is None:
            continue
        heads = cache.kept_positions(layer.layer_idx)[0]
        recent = min(RECENT, context_len)
        kept = sum(len(h) for h in heads) / (len(heads) * context_len)
        kept_recent = sum(int((h >= context_len - recent).sum()) for h in heads) / (len(heads) * recent)
        shares[layer.layer_idx] = (kept, kept_recent)
    return shares


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="gemma3-270m")
    parser.add_argument("--policies", default="kvzip,fastkvzip,snapkv,streamingllm")
    parser.add_argument("--ratios", default="0.5,0.75")
    parser.add_argument("--samples", type=int, default=5)
    parser.add_argument("--length", type=int, default=4096)
    parser.add_argument("--continuation", type=int, default=128)
    parser.add_argument("--allocation", default=None, help="allocation for every compressing policy (each one's "
                        "default when omitted)")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    if args.samples < 1 or not 1 < args.continuation < args.length // 2:
        parser.error("--samples must be >= 1 and --continuation between 2 and half of --length")
    if args.threads:
        torch.set_num_threads(args.threads)
    model, tok = kvevict.load_model(args.model, dtype=args.dtype)
    ratios = [float(r) for r in args.ratios.split(",")]
    runs = [("full", 0.0)] + [(p, r) for r in ratios for p in args.policies.split(",")]
    prompt = tok(FIRST_PROMPT + assistant_prefix(tok), add_special_tokens=False).input_ids
    rows = {f"{p}@{r}": [] for p, r in runs}
    for sample in fidelity(tok, args.length, args.samples, seed=0, continuation=args.continuation):
        ctx, cont = sample.context_ids, sample.continuation_ids
        prefix = torch.tensor([ctx[:-1]])
        forced = torch.tensor([ctx[-1:] + cont[:-1]])
        reference = None
        for name, ratio in runs:
            sizing = {"compression_ratio": ratio} | ({"allocation": args.allocation} if args.allocation else {})
            policy = kvevict.make_policy(name, **sizing) if ratio else kvevict.make_policy(name)
            cache = EvictingCache(model, policy, tokenizer=tok)
            prefill(model, cache, prefix, torch.ones_like(prefix), policy.prefill_chunk)
            logits = teacher_forced(model, cache, forced)
            reference = logits if reference is None else reference
            m = fidelity_metrics(reference, logits, torch.tensor(cont))
            quarters = copy_nll(model, cache, prompt, ctx[1:])  # the context after its BOS
            row = {"kl": m["kl"], "top1": m["top1"], "copy_nll": sum(quarters) / 4, "copy_nll_quarters": quarters,
                   "kept": {str(k): v for k, v in kept_shares(cache, prefix.shape[1]).items()}}
            rows[f"{name}@{ratio}"].append(row)
            kept = row["kept"].items()
            layers = "; ".join(f"L{k} kept {a:.2f} / last {b:.2f}" for k, (a, b) in kept) if len(kept) <= 6 else ""
            print(f"sample {sample.index} {name}@{ratio}: KL {row['kl']:.3f}, top-1 {row['top1']:.3f}, copy NLL "
                  f"{row['copy_nll']:.3f} (quarters {' / '.join(f'{q:.2f}' for q in quarters)})  {layers}", flush=True)

    def mean(values):
        return sum(values) / len(values)

    summary = {}
    print(f"\n| policy | ratio | continuation KL | top-1 | copy NLL | copy NLL by quarter | kept of the last {RECENT} |"
          "\n|---|---:|---:|---:|---:|---|---:|")
    for key, samples in rows.items():
        name, ratio = key.split("@")
        recent = mean([mean([b for _, b in s["kept"].values()]) for s in samples])
        summary[key] = {k: mean([s[k] for s in samples]) for k in ("kl", "top1", "copy_nll")}
        summary[key]["copy_nll_quarters"] = [mean([s["copy_nll_quarters"][q] for s in samples]) for q in range(4)]
        summary[key]["kept_recent"] = recent
        s = summary[key]
        quarters = " / ".join(f"{q:.2f}" for q in s["copy_nll_quarters"])
        print(f"| {name} | {ratio} | {s['kl']:.3f} | {s['top1']:.3f} | {s['copy_nll']:.3f} | {quarters} | {recent:.2f} |")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"model": args.model, "allocation": args.allocation, "length": args.length, "continuation": args.continuation,
                                    "dtype": args.dtype, "threads": torch.get_num_threads(),
                                    "summary": summary, "samples": rows}, indent=2))


if __name__ == "__main__":
    main()
