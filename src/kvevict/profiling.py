"""Profiling reports of the methods that have one, kept out of the policies themselves.

- FastGen: which hybrid policy each (layer, KV head) chose on a prompt, its recovery, the compression that
  follows and what profiling costs next to the prefill (a table and a heat map).
- AhaKV: where kept tokens sit in the context under h2o, AhaKV and its ablations (a table and histograms).

`PROFILES` maps a policy name to its report; `kvevict profile --policy NAME` runs it.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any, Callable

import torch

from .api import prefill
from .cache import EvictingCache
from .chat import has_template, user_turn
from .compat import cache_kwargs
from .policies import make_policy
from .policies.ahakv import PARTS, AhaKVPolicy
from .policies.base import ObserverSet, Policy
from .policies.fastgen import CANDIDATES, SHORT_NAMES, FastGenPolicy, FastGenState


# ---------------------------------------------------------------------------------------------- shared
def prompt_ids(tokenizer, prompt: str) -> tuple[torch.Tensor, bool]:
    """Token ids [1, n] of `prompt` as kvevict.generate feeds it (through the chat template when the tokenizer
    has one, which is where chat special tokens come from), and whether the template was used."""
    chat = has_template(tokenizer)
    if chat:
        prompt = user_turn(tokenizer, prompt)
    ids = tokenizer(prompt, return_tensors="pt", add_special_tokens=not chat).input_ids
    if ids.shape[1] < 2:
        raise ValueError("prompt is too short to profile: give at least two tokens")
    return ids, chat


def timed_prefill(model, cache, input_ids: torch.Tensor) -> float:
    """Seconds one forward of `input_ids` into `cache` takes (logits of the last token only)."""
    started = time.perf_counter()
    with torch.no_grad():
        model(input_ids=input_ids.to(model.device), **cache_kwargs(cache), use_cache=True, logits_to_keep=1)
    return time.perf_counter() - started


def achieved_ratio(cache: EvictingCache) -> torch.Tensor:
    """Fraction of (evictable layer, KV head, token) entries removed right now, from the cache's kept counts vs
    the real tokens seen: [B]. FastGen's compression is an outcome of its rules; this measures it."""
    layers = [layer.layer_idx for layer in cache.layers if layer.evictable and layer.store is not None]
    counts = cache.kept_counts()[layers]  # [N, B, H]
    total = cache.tokens_seen.cpu().double() * counts.shape[0] * counts.shape[2]
    return 1.0 - counts.sum((0, 2)).double() / total


def _model_name(model) -> str:
    return getattr(model.config, "name_or_path", "") or type(model).__name__


# ---------------------------------------------------------------------------------------------- FastGen
def summarize(cache: EvictingCache, row: int = 0) -> dict:
    """What the FastGen profile of `cache` chose for batch row `row` and what the cache holds: plain numbers.

    fractions: share of (evictable layer, KV head) pairs per candidate; compression_ratio: from the cache's kept
    counts (evictable layers); recovery_mean/min: recovery of the chosen candidates on the profiled rows;
    grid: [layers][heads] chosen candidate, -1 for layers never evicted (sliding window).
    """
    state = cache.state
    if not isinstance(state, FastGenState):
        raise ValueError(f"the cache is not managed by a fastgen policy: {cache.policy!r}")
    choices, recovery, kept_now = state.head_choices(), state.head_recovery(), cache.kept_counts()
    layers = sorted(choices)
    heads = kept_now.shape[2]
    grid = torch.full((len(cache.layers), heads), -1, dtype=torch.long)
    chosen_recovery, per_layer = [], []
    for layer in layers:
        choice = choices[layer][row]
        grid[layer] = choice
        rec = recovery[layer][row].gather(-1, choice.view(-1, 1)).squeeze(-1)
        chosen_recovery.append(rec)
        per_layer.append({"layer": layer, "policy": [CANDIDATES[int(c)] for c in choice],
                          "recovery": [round(float(r), 4) for r in rec], "kept": kept_now[layer, row].tolist()})
    chosen = torch.cat(chosen_recovery)
    picked = grid[layers].flatten()
    return {
        "threshold": float(state.threshold[row]),
        "target_ratio": float(state.compression_ratio) or None,
        "evictable_layers": len(layers),
        "kv_heads": heads,
        "profiled_rows": min(p.rows for p in state.profiles.values()),
        "fractions": {name: float((picked == c).float().mean()) for c, name in enumerate(CANDIDATES)},
        "compression_ratio": float(achieved_ratio(cache)[row]),
        "kv_bytes": cache.nbytes(),
        "full_kv_bytes": cache.full_nbytes(),
        "recovery_mean": float(chosen.mean()),
        "recovery_min": float(chosen.min()),
        "layers": per_layer,
        "grid": grid.tolist(),
    }


def fastgen_profile_stats(model, tokenizer, prompt: str, policy: FastGenPolicy, baseline: bool = True) -> dict:
    """Prefill `prompt` (batch 1) with `policy` and summarize its profile; with `baseline`, first time a prefill
    with the full cache (after a short warm-up). Returns plain numbers, plus the cache under "_cache"."""
    if not isinstance(policy, FastGenPolicy):
        raise ValueError(f"policy must be a fastgen policy, got {type(policy).__name__}")
    ids, chat = prompt_ids(tokenizer, prompt)
    stats: dict[str, Any] = {"model": _model_name(model), "prompt_tokens": int(ids.shape[1]), "chat_template": chat}
    if baseline:
        timed_prefill(model, EvictingCache(model, make_policy("full")), ids[:, :64])  # warm-up
        stats["prefill_full_s"] = timed_prefill(model, EvictingCache(model, make_policy("full")), ids)
    cache = EvictingCache(model, policy, tokenizer=tokenizer)
    stats["prefill_fastgen_s"] = timed_prefill(model, cache, ids)
    stats["profile_s"] = cache.state.profile_seconds
    if baseline:
        stats["profile_pct_of_prefill"] = 100.0 * stats["profile_s"] / stats["prefill_full_s"]
    stats.update(summarize(cache))
    stats["_cache"] = cache
    return stats


def plot_heads(grid, path: Path, title: str) -> Path:
    """Heat map layer x KV head -> chosen policy (grey: sliding-window layers, never evicted). Writes a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import BoundaryNorm, ListedColormap

    grid = torch.as_tensor(grid)
    colors = ["#d9d9d9", "#1b9e77", "#66a61e", "#e6ab02", "#d95f02", "#7570b3"]
    cmap = ListedColormap(colors)
    norm = BoundaryNorm([i - 1.5 for i in range(len(colors) + 1)], cmap.N)
    layers, heads = grid.shape
    fig, ax = plt.subplots(figsize=(4.6 + 0.5 * heads, 1.6 + 0.22 * layers))
    ax.imshow(grid.numpy(), cmap=cmap, norm=norm, aspect="auto", interpolation="nearest")
    ax.set_xticks(range(heads))
    ax.set_xlabel("KV head")
    ax.set_ylabel("layer")
    ax.set_yticks(range(0, layers, max(1, layers // 15)))
    ax.set_title(title, fontsize=9)
    handles = [plt.Rectangle((0, 0), 1, 1, color=colors[i + 1]) for i in range(len(CANDIDATES))]
    labels = list(CANDIDATES)
    if bool((grid < 0).any()):
        handles.insert(0, plt.Rectangle((0, 0), 1, 1, color=colors[0]))
        labels.insert(0, "sliding window (not evicted)")
    ax.legend(handles, labels, loc="upper left", bbox_to_anchor=(1.02, 1.0), fontsize=7, frameon=False)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def format_fastgen_report(stats: dict) -> str:
    """The printed profiling report: per-layer table, fractions of heads per policy, ratio, recovery, timing."""
    heads = stats["kv_heads"]
    lines = [
        f"FastGen profile of {stats['model']}: {stats['prompt_tokens']} prompt tokens"
        f"{' (chat template)' if stats['chat_template'] else ''}, {stats['profiled_rows']} query rows profiled, "
        f"T = {stats['threshold']:.4f}"
        + (f" (searched for target ratio {stats['target_ratio']:g})" if stats.get("target_ratio") else ""),
        "",
        "layer | " + " | ".join(f"head {h}: policy, recovery, kept" for h in range(heads)),
    ]
    for row in stats["layers"]:
        cells = [f"{SHORT_NAMES[CANDIDATES.index(p)]:>7} {r:.3f} {k:>6}"
                 for p, r, k in zip(row["policy"], row["recovery"], row["kept"])]
        lines.append(f"{row['layer']:>5} | " + " | ".join(cells))
    skipped = stats["evictable_layers"] != len(stats["grid"])
    lines += [
        "",
        "legend: S = special, P = punctuation, F = frequent, L = local"
        + ("; sliding-window layers are not profiled (never evicted)" if skipped else ""),
        "heads per policy: " + ", ".join(f"{name} {100 * f:.1f}%" for name, f in stats["fractions"].items()),
        f"compression ratio (evictable layers): {stats['compression_ratio']:.4f}   "
        f"KV bytes {stats['kv_bytes'] / 2**20:.1f} MiB of {stats['full_kv_bytes'] / 2**20:.1f} MiB",
        f"recovery of the chosen policies: mean {stats['recovery_mean']:.4f}, min {stats['recovery_min']:.4f}",
    ]
    timing = f"profiling {stats['profile_s']:.3f} s; prefill with fastgen {stats['prefill_fastgen_s']:.3f} s"
    if "prefill_full_s" in stats:
        timing += (f", with the full cache {stats['prefill_full_s']:.3f} s "
                   f"(profiling = {stats['profile_pct_of_prefill']:.1f}% of the full prefill)")
    lines.append(timing)
    return "\n".join(lines)


def fastgen_profile(model, tokenizer, prompt: str, policy: FastGenPolicy, out_dir: Path) -> str:
    """`kvevict profile --policy fastgen`: profile `prompt`, write the heat map PNG into out_dir, return the report."""
    stats = fastgen_profile_stats(model, tokenizer, prompt, policy)
    stats.pop("_cache")
    name = Path(str(stats["model"])).name or "model"
    png = plot_heads(stats["grid"], Path(out_dir) / f"fastgen_heads_{name}_T{stats['threshold']:.2f}.png",
                     f"FastGen {name}\nT={stats['threshold']:.3f}, ratio {stats['compression_ratio']:.3f}")
    return format_fastgen_report(stats) + f"\nheat map: {png}"


# ---------------------------------------------------------------------------------------------- AhaKV
def _bias_variants(policy: AhaKVPolicy, budget: int) -> dict[str, Policy]:
    """h2o (with and without its recent half), `policy`'s AhaKV and each single-part ablation, at one budget."""
    sizing = dict(budget=budget, decode_interval=None, allocation=policy.allocation, head_floor=policy.head_floor)
    own = {k: v for k, v in policy.params().items() if k not in Policy.SIZING_PARAMS}
    variants: dict[str, Policy] = {
        "h2o": make_policy("h2o", **sizing),
        "h2o recent_fraction=0": make_policy("h2o", recent_fraction=0.0, **sizing),
    }
    main = AhaKVPolicy(**own, **sizing)
    variants[main.variant()] = main
    for part in PARTS:
        if own[part]:
            ablation = AhaKVPolicy(**{**own, part: False}, **sizing)
            variants[ablation.variant()] = ablation
    return variants


def position_bias(model, tokenizer, prompt: str, policy: AhaKVPolicy | None = None, budget: int | None = None) -> dict:
    """Prefill `prompt` once and evict it under h2o, h2o with recent_fraction=0, AhaKV and each single-part
    ablation at the same `budget` (tokens per layer and KV head; default 25% of the prompt).

    Returns {"tokens": n, "budget": k, "layers": evictable layers, "variants": {label: {"positions": LongTensor
    of every kept (layer, KV head, token) position, 0 = the first prompt token; "window": protected recent
    tokens}}}.
    """
    policy = AhaKVPolicy() if policy is None else policy
    ids = tokenizer(prompt, return_tensors="pt").input_ids.to(model.device)
    n = ids.shape[1]
    if budget is None:
        budget = policy.budget if policy.budget is not None else math.ceil(0.25 * n)
    if not 1 <= budget < n:
        raise ValueError(f"budget must be between 1 and the prompt's length - 1 ({n - 1} tokens), got {budget}")
    variants = _bias_variants(policy, budget)
    observed = EvictingCache(model, ObserverSet(list(variants.values())))
    prefill(model, observed, ids, torch.ones_like(ids), policy.prefill_chunk)
    layers = [layer.layer_idx for layer in observed.layers if layer.evictable]
    out = {"tokens": n, "budget": budget, "layers": layers, "variants": {}}
    for label, variant in variants.items():
        fork = observed.fork(variant)
        fork.evict()
        kept = [p for layer in layers for p in fork.kept_positions(layer)[0]]
        window = fork.state.recent_window(budget, fork.eviction_context())
        out["variants"][label] = {"positions": torch.cat(kept), "window": window}
        del fork
    return out


def bias_stats(positions: torch.Tensor, tokens: int, window: int, entries: int) -> dict:
    """Where kept tokens sit: fraction in the second half of the context, in its first 10%, and the second-half
    fraction among the tokens chosen by score (outside the protected recent window). `entries` = layers x heads."""
    pos = positions.double()
    scored = pos[pos < tokens - window]
    return {
        "kept_per_head": positions.numel() / entries,
        "second_half": float((pos >= tokens / 2).double().mean()),
        "first_tenth": float((pos < tokens / 10).double().mean()),
        "second_half_scored": float((scored >= tokens / 2).double().mean()) if scored.numel() else float("nan"),
        "mean_position": float(pos.mean() / tokens),
    }


def plot_position_histograms(relative: dict[str, torch.Tensor], path: Path, title: str, bins: int = 40,
                             protected: dict[str, float] | None = None) -> None:
    """One histogram per variant of kept positions given as fractions of the context (0 = start, 1 = end);
    `protected` shades each variant's protected recent window (as a fraction of the context)."""
    from matplotlib.figure import Figure  # no pyplot: leaves the caller's backend alone, renders with Agg

    fig = Figure(figsize=(8, 1.6 * len(relative) + 0.8))
    axes = fig.subplots(len(relative), 1, sharex=True, squeeze=False)[:, 0]
    for ax, (label, frac) in zip(axes, relative.items()):
        counts = torch.histc(frac.double(), bins=bins, min=0.0, max=1.0)
        share = (counts / counts.sum().clamp_min(1)).numpy()
        ax.bar((torch.arange(bins) + 0.5).numpy() / bins, share, width=1.0 / bins, color="tab:blue")
        ax.axhline(1.0 / bins, color="gray", lw=0.8, ls=":")
        ax.axvline(0.5, color="black", lw=0.8, ls="--")
        if protected and protected.get(label):
            ax.axvspan(1.0 - protected[label], 1.0, color="tab:orange", alpha=0.2, lw=0)
        second = float((frac >= 0.5).double().mean())
        ax.set_ylabel("share", fontsize=8)
        ax.set_title(f"{label}: {second:.1%} of kept tokens in the second half", fontsize=9, loc="left")
    axes[-1].set_xlabel("position of kept token / context length (dotted: uniform spread; shaded: protected window)")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def format_bias_table(rows: dict[str, dict]) -> str:
    head = f"{'variant':<24} {'kept/head':>9} {'2nd half':>9} {'first 10%':>9} {'2nd half, scored':>17} {'mean pos':>9}"
    lines = [head]
    for label, s in rows.items():
        lines.append(f"{label:<24} {s['kept_per_head']:>9.0f} {s['second_half']:>9.3f} {s['first_tenth']:>9.3f} "
                     f"{s['second_half_scored']:>17.3f} {s['mean_position']:>9.3f}")
    return "\n".join(lines)


def ahakv_profile(model, tokenizer, prompt: str, policy: AhaKVPolicy, out_dir: Path) -> str:
    """`kvevict profile --policy ahakv`: the positional bias AhaKV removes, on one prompt.

    Evicts the prompt under h2o, h2o with recent_fraction=0 (pure accumulated attention), AhaKV and each
    single-part ablation at the policy's budget (with a ratio: ceil((1 - ratio) n); neither: 25% of the prompt),
    writes the histograms of kept positions to out_dir/ahakv_position_bias.png and returns the report.
    """
    n = len(tokenizer(prompt).input_ids)
    budget = policy.budget
    if budget is None:
        budget = math.ceil((1 - policy.compression_ratio) * n) if policy.compression_ratio else math.ceil(0.25 * n)
    result = position_bias(model, tokenizer, prompt, policy, budget)
    entries = len(result["layers"]) * model.config.get_text_config(decoder=True).num_key_value_heads
    rows = {label: bias_stats(v["positions"], n, v["window"], entries) for label, v in result["variants"].items()}
    path = Path(out_dir) / "ahakv_position_bias.png"
    name = _model_name(model)
    plot_position_histograms({label: v["positions"].double() / n for label, v in result["variants"].items()}, path,
                             f"{name}: kept positions, {n}-token prompt, budget {budget} tokens per head",
                             protected={label: v["window"] / n for label, v in result["variants"].items()})
    return "\n".join([
        f"AhaKV position bias on {name}: {n}-token prompt, budget {budget} tokens per layer and KV head "
        f"({budget / n:.0%} of the prompt), {len(result['layers'])} evictable layers",
        format_bias_table(rows),
        "2nd half: share of kept (layer, head, token) entries in the second half of the context (0.5 = no bias);",
        "scored: the same among tokens chosen by score, outside each variant's protected recent window.",
        f"histograms: {path}",
    ])


# policy name -> report(model, tokenizer, prompt, policy, out_dir) -> printed text
PROFILES: dict[str, Callable[..., str]] = {"fastgen": fastgen_profile, "ahakv": ahakv_profile}
