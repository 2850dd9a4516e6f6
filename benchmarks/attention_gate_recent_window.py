"""Attention-Gate with a recent window: do the trained gates lose to StreamingLLM because their flags act at once?

A flag is final when its token arrives, so a key the gate drops is hidden from the very next query on. This
script asks what the shipped gates would score if a flagged key stayed visible to the `W` queries after it (and
left the cache only then), with no retraining: one forward per held-out window, the gates' flags taken in-context
as in `kvevict.gates.attention_gate.flagged_forward`, attention masked with

    query i sees key j  <=>  j <= i  and  (kept_j  or  i - j < W  or  j is a continuation token)

over the first `length - continuation` tokens (the compressed context), then KL to the full model on the last
`continuation` tokens, the measure and windows of `attention_gate_eval.py`'s heldout-kl part (W = 0 is that part's
Attention-Gate row). The ratio is the share of the context's gated entries gone by the end of the context.

    python benchmarks/attention_gate_recent_window.py --model smollm2-135m --windows 0,16,64,256 \
        --out results/attention_gate/recent_window.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import AttentionInterface

import kvevict
from kvevict.compat import attention_implementation
from kvevict.eval.metrics import fidelity_metrics
from kvevict.gates.attention_gate import flagged_forward, load_attention_gates, resolve_gates_dir

from attention_gate_eval import heldout_windows  # the heldout-kl part's windows (this folder is on sys.path)

IMPLEMENTATION = "kvevict_recent_window_experiment"
_SETTING: dict = {}  # records, window, context length of the forward under way


def recent_window_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """Causal attention where a flagged context key stays visible to the `window` queries after it."""
    B, Hq, T, d = query.shape
    H = key.shape[1]
    i = torch.arange(T).view(-1, 1)
    j = torch.arange(T).view(1, -1)
    allowed = i >= j
    sliding = kwargs.get("sliding_window") or getattr(module, "sliding_window", None)
    if sliding:
        allowed &= i - j < sliding
    record = _SETTING["records"].get(module.layer_idx)
    mask = allowed.view(1, 1, T, T)
    if record is not None:
        kept = record.flags.permute(0, 2, 1) > 0.5  # [B, H, T]
        kept[..., _SETTING["context"]:] = True  # the teacher-forced tokens are not flagged (frozen cache)
        near = i - j < max(_SETTING["window"], 1)  # the own position always
        visible = allowed & (near | kept.unsqueeze(2))  # [B, H, T, T]
        mask = visible.repeat_interleave(Hq // H, dim=1)
    softcap = kwargs.get("softcap")
    if softcap is not None:
        raise ValueError("logit soft-capping is not supported by this experiment")
    out = F.scaled_dot_product_attention(query, key.repeat_interleave(Hq // H, dim=1),
                                         value.repeat_interleave(Hq // H, dim=1), attn_mask=mask, scale=scaling)
    return out.transpose(1, 2).contiguous(), None


def evicted_share(records: dict, context: int, window: int) -> float:
    """Share of the gated (layer, head, context token) entries flagged and older than the window at the end of
    the context (sink tokens are never flagged)."""
    gone, total = 0, 0
    for record in records.values():
        flags = record.flags[0, :context] > 0.5  # [context, H]
        age = context - 1 - torch.arange(context)
        out = ~flags & (age >= window).view(-1, 1)
        gone += int(out.sum())
        total += flags.numel()
    return gone / max(total, 1)


def run(model, tok, gates_dir: Path, windows: list[int], length: int, continuation: int, per_source: int,
        seed: int) -> dict:
    config, gates, meta = load_attention_gates(gates_dir, model)
    AttentionInterface.register(IMPLEMENTATION, recent_window_attention)
    context = length - continuation
    rows = {w: [] for w in windows}
    for source, window in heldout_windows(tok, meta, length, per_source, seed):
        ids = window.unsqueeze(0)
        targets = ids[0, context:]
        with torch.no_grad():
            full = model(input_ids=ids).logits[0, context - 1 : length - 1]
            for w in windows:
                with flagged_forward(model, gates, config, straight_through=False) as records:
                    _SETTING.update(records=records, window=w, context=context)
                    with attention_implementation(model, IMPLEMENTATION):
                        logits = model(input_ids=ids).logits[0, context - 1 : length - 1]
                m = fidelity_metrics(full, logits, targets)
                rows[w].append({"source": source, "kl": m["kl"], "top1": m["top1"], "ppl_ratio": m["ppl_ratio"],
                                "evicted": evicted_share(records, context, w)})
    mean = {w: {k: sum(r[k] for r in rs) / len(rs) for k in ("kl", "top1", "ppl_ratio", "evicted")}
            for w, rs in rows.items()}
    return {"gates": str(gates_dir), "length": length, "continuation": continuation,
            "windows_per_source": per_source, "seed": seed, "mean": mean, "per_window": rows}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--gates", help="gate checkpoint folder (default: the shipped gates)")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--windows", default="0,16,64,256", help="comma-separated recent windows W (tokens)")
    parser.add_argument("--length", type=int, default=2048)
    parser.add_argument("--continuation", type=int, default=128)
    parser.add_argument("--per-source", type=int, default=5, help="held-out windows per source")
    parser.add_argument("--threads", type=int)
    parser.add_argument("--out", default="results/attention_gate/recent_window.json")
    args = parser.parse_args()
    windows = [int(w) for w in args.windows.split(",")]
    if min(windows) < 0:
        parser.error(f"--windows: recent windows are token counts >= 0, got {args.windows}")
    if not 0 < args.continuation < args.length:
        parser.error(f"--continuation must be in (0, --length), got {args.continuation} with --length {args.length}")
    if args.threads:
        torch.set_num_threads(args.threads)
    model, tok = kvevict.load_model(args.model, dtype=args.dtype)
    gates_dir = resolve_gates_dir(args.gates, model)
    t0 = time.perf_counter()
    result = run(model, tok, gates_dir, windows, args.length, args.continuation, args.per_source, seed=1)
    result["seconds"] = time.perf_counter() - t0
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print("| W | evicted | KL | top-1 | ppl ratio |\n|---:|---:|---:|---:|---:|")
    for w, m in result["mean"].items():
        print(f"| {w} | {m['evicted']:.3f} | {m['kl']:.3f} | {m['top1']:.3f} | {m['ppl_ratio']:.3f} |")


if __name__ == "__main__":
    main()
