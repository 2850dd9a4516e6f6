"""Where KVzip loses gemma3's continuation: one global layer, and the punctuation tokens it attends to.

gemma3-270m reads its context through 3 global layers (5, 11, 17; the others slide over 512 tokens). On the
harness's fidelity samples (essays, `--length` tokens, the last 128 teacher-forced), bf16:
1. one layer at a time: KVzip and SnapKV (uniform allocation, `--ratio`) evict in that global layer only, the
   other two keep everything: the continuation's KL to the full cache;
2. what the continuation reads there (sample 0): the full model's attention of the continuation's queries over the
   context (eager, mean over the query heads), the share of it that each policy's kept keys carry per global
   layer, and in the first global layer the tokens that draw the most;
3. the same scores with the context's punctuation-only tokens (FastGen's token kinds) kept first, our probe and
   not the paper's: KL of kvzip and fastkvzip at 0.5 and 0.75, alone and with a 1,024-token recent window.

    python benchmarks/kvzip_gemma3_layers.py --threads 2 --out results/kvzip/gemma3_layers.json
"""

from __future__ import annotations

import argparse
import json
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import torch

import kvevict
from kvevict.api import prefill
from kvevict.cache import EvictingCache
from kvevict.compat import attention_implementation, cache_kwargs
from kvevict.eval.metrics import fidelity_metrics
from kvevict.eval.tasks import fidelity
from kvevict.policies.fastgen import PUNCT, token_kinds
from kvevict.policies.fastkvzip import FastKVzipPolicy
from kvevict.policies.kvzip import KVzipPolicy
from kvevict.policies.snapkv import SnapKVPolicy

CONTEXT_KINDS: dict[str, torch.Tensor] = {}  # "kinds": the token kind of every context position (batch of one)


def one_layer(policy_class, layer: int):
    """`policy_class` evicting in `layer` only (uniform allocation: each layer's selection is its own)."""
    state_class = policy_class.State

    class OneLayerState(state_class):
        def select(self, scores, positions, eviction):
            keep = super().select(scores, positions, eviction)
            return {i: mask if i == layer else positions[i] >= 0 for i, mask in keep.items()}

    @dataclass(frozen=True)
    class OneLayer(policy_class):
        State = OneLayerState

    return OneLayer


def punctuation_first(policy_class):
    """`policy_class` whose scores put the context's punctuation-only tokens above every other token."""
    state_class = policy_class.State

    class PunctuationFirstState(state_class):
        def score(self, layer_idx, ctx):
            scores = state_class.score(self, layer_idx, ctx)
            positions = ctx.view.positions.long()
            kinds = CONTEXT_KINDS["kinds"][positions.clamp(min=0)]
            return torch.where((positions >= 0) & (kinds == PUNCT), scores.new_full((), 2.0), scores)

    @dataclass(frozen=True)
    class PunctuationFirst(policy_class):
        State = PunctuationFirstState

    return PunctuationFirst


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=5)
    parser.add_argument("--length", type=int, default=4096)
    parser.add_argument("--ratio", type=float, default=0.5)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    if args.samples < 1 or args.length < 512 or not 0 < args.ratio < 1:
        parser.error("--samples must be >= 1, --length >= 512 (128 tokens are teacher-forced) and 0 < --ratio < 1")
    if args.threads:
        torch.set_num_threads(args.threads)
    model, tok = kvevict.load_model("gemma3-270m", dtype="bfloat16")
    global_layers = [i for i, kind in enumerate(model.config.layer_types) if kind == "full_attention"]
    kinds_table = token_kinds(tok)
    samples = fidelity(tok, args.length, args.samples, seed=0, continuation=128)

    def compressed(policy, prefix):
        cache = EvictingCache(model, policy, tokenizer=tok)
        prefill(model, cache, prefix, torch.ones_like(prefix), policy.prefill_chunk)
        return cache

    def continuation_logits(cache, forced):
        mask = torch.ones(1, cache.seen + forced.shape[1], dtype=torch.long)
        with torch.no_grad(), cache.frozen_tokens():
            return model(input_ids=forced, attention_mask=mask, **cache_kwargs(cache)).logits[0].float()

    runs = {}
    for layer in global_layers:
        for name, cls in (("kvzip", KVzipPolicy), ("snapkv", SnapKVPolicy)):
            runs[f"{name}, layer {layer} only, {args.ratio}"] = one_layer(cls, layer)(
                compression_ratio=args.ratio, allocation="uniform")
    for ratio in (0.5, 0.75):
        for name, cls in (("kvzip", KVzipPolicy), ("fastkvzip", FastKVzipPolicy)):
            runs[f"{name}, punctuation kept, {ratio}"] = punctuation_first(cls)(compression_ratio=ratio)
        runs[f"fastkvzip, punctuation kept, window 1024, {ratio}"] = punctuation_first(FastKVzipPolicy)(
            compression_ratio=ratio, window=1024)
        runs[f"snapkv, {ratio}"] = SnapKVPolicy(compression_ratio=ratio)
    kl = {name: [] for name in runs}
    for sample in samples:
        prefix = torch.tensor([sample.context_ids[:-1]])
        forced = torch.tensor([sample.context_ids[-1:] + sample.continuation_ids[:-1]])
        targets = torch.tensor(sample.continuation_ids)
        CONTEXT_KINDS["kinds"] = kinds_table[prefix[0]]
        reference = continuation_logits(compressed(kvevict.make_policy("full"), prefix), forced)
        for name, policy in runs.items():
            value = fidelity_metrics(reference, continuation_logits(compressed(policy, prefix), forced), targets)["kl"]
            kl[name].append(value)
            print(f"sample {sample.index} {name}: KL {value:.3f}", flush=True)
    summary = {name: sum(v) / len(v) for name, v in kl.items()}

    # 2. what the continuation reads in each global layer (sample 0)
    sample = samples[0]
    context = sample.context_ids[:-1]
    n = len(context)
    with torch.no_grad(), attention_implementation(model, "eager"):
        attentions = model(input_ids=torch.tensor([sample.context_ids + sample.continuation_ids[:-1]]),
                           output_attentions=True).attentions
    prefix = torch.tensor([context])
    kept = {name: compressed(cls(compression_ratio=args.ratio, allocation="uniform"), prefix)
            for name, cls in (("kvzip", KVzipPolicy), ("snapkv", SnapKVPolicy))}
    reads = {}
    for layer in global_layers:
        mass = attentions[layer][0, :, -128:, :n].float().mean(0).sum(0) / 128  # per context key
        row = {"context_share": float(mass.sum())}
        for name, cache in kept.items():
            positions = cache.kept_positions(layer)[0][0]
            row[f"{name}_keeps"] = float(mass[positions].sum() / mass.sum())
        reads[layer] = row
        print(f"layer {layer}: the continuation's attention on the context {row['context_share']:.3f}; share on "
              f"the kept keys: kvzip {row['kvzip_keeps']:.3f}, snapkv {row['snapkv_keeps']:.3f}", flush=True)
    first = global_layers[0]
    mass = attentions[first][0, :, -128:, :n].float().mean(0).sum(0) / 128
    top = mass.argsort(descending=True)[:200].tolist()
    kept_first = {name: set(cache.kept_positions(first)[0][0].tolist()) for name, cache in kept.items()}
    top_tokens = {"mass_share": float(mass[top].sum() / mass.sum()),
                  "tokens": Counter(tok.decode([context[j]]) for j in top).most_common(8),
                  **{f"{name}_keeps": sum(j in s for j in top) for name, s in kept_first.items()}}
    print(f"layer {first}, the 200 keys the continuation reads most ({top_tokens['mass_share']:.2f} of its "
          f"attention): {top_tokens['tokens']}; kept by kvzip {top_tokens['kvzip_keeps']}, snapkv "
          f"{top_tokens['snapkv_keeps']}", flush=True)
    print("\n| run | KL |\n|---|---:|")
    for name, value in summary.items():
        print(f"| {name} | {value:.3f} |")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"samples": args.samples, "length": args.length, "ratio": args.ratio,
                                    "kl": summary, "kl_per_sample": kl, "continuation_reads": reads,
                                    "first_global_layer_top_keys": top_tokens}, indent=2))


if __name__ == "__main__":
    main()
