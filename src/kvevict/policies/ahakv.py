"""AhaKV (Gu et al., "AhaKV: Adaptive Holistic Attention-Driven KV Cache Eviction", arXiv 2506.03762).

H2O's accumulated attention S_j = sum_{i >= j} a_ij has fewer summands the later token j sits (causal mask),
so it falls with position in expectation and the kept tokens pile up at the start of the context. AhaKV
de-biases it with three parts, each a switch here for the paper's ablation:

- recent accumulation (RA, `recent_accumulation`): S_j sums the attention of the last `recent_rows` query rows
  only (r = 32 in the paper), so every candidate token is summed over the same queries;
- Step Gain softmax (SG, `step_gain`): those rows are recomputed with logits lambda * q.k instead of
  q.k / sqrt(d), lambda = sqrt(2 ln(n / k) / d), n = tokens seen, k = budget, whenever n > k. With Gaussian
  logits the expected entropy of the softmax is ln n - lambda^2 d / 2; this lambda sets it to ln k, as if the
  attention were spread over as many tokens as the cache will keep;
- value prior (VPE, `value_prior`): score_j = gamma_bar_j * S_j, where gamma is a 1-D average pool of the
  squared value norms ||v_j||^2 and gamma_bar = gamma / max(gamma).

The cache keeps the `window` (= r) most recent tokens plus the top (budget - r) by score; the paper's budget
is 1000 tokens per layer and head. Reported (LongBench average, budget 1000): Llama-3-8B-Inst 41.63 vs 38.93
for H2O and 41.94 with the full cache; removing RA, SG or VPE costs 0.8-1.5 points each.

Measured here (benchmarks/ahakv_position_bias.py: 4k-token essays, budget 25% of the prompt, share of kept
tokens in the second half of the context, smollm2-135m / gemma3-270m): pure accumulated attention (h2o with
recent_fraction=0) 0.41 / 0.25; AhaKV 0.83 / 0.69. RA removes the start bias but moves the budget towards the
end, where the last r queries look; without RA (SG and VPE over every query row) 0.50 / 0.41.

Our choices where the paper is silent (all parameters):
- GQA (`group_reduction="mean"`): S_j is averaged over the G query heads that read the KV head. A KV entry is
  shared by the whole group, so the mass the group puts on it is what evicting it costs; the mean is that mass
  over G (the ranking of H2O's group sum, SnapKV's group mean), so a token several heads read steadily outranks
  one that a single head glances at. "max" keeps whatever any one head needs most.
- `pool_kernel=5`: the small end of SnapKV's 5-7 smoothing kernels; it lets a token borrow the value norms of
  its neighbours without washing out single large-norm tokens. Pooling runs over the kept tokens in position
  order ('same' padding, empty slots of the padded view excluded); value norms are per KV head.
- n is the number of real tokens each batch row has seen (padding excluded) and k that row's target (the
  budget, or ceil((1 - ratio) n) when sized by a ratio); lambda changes only the scoring attention, never the
  model's own attention. Below n = k the model's own scale (1/sqrt(d) for these models) is used.
- With RA off the attention is accumulated over every query row as it arrives (H2O's score), per query head so
  that the group reduction applies afterwards; SG then uses the n and k of the forward the query arrived in.
- `decode_interval=1`: the paper keeps the budget fixed while generating, each new token entering and the
  scores being updated. With RA the score depends only on the last r queries, so the ranking moves at every
  step and evicting each step is what keeps exactly `budget` tokens. It costs a re-score of every evictable
  layer per token (r x budget attention logits per query head, the value prior) and a compaction; a larger
  interval trades a cache of up to budget + interval tokens for less of that overhead.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from ..attention import accumulated_attention
from .base import Policy

GROUP_REDUCTIONS = ("mean", "max")
_PARTS = {"recent_accumulation": "RA", "step_gain": "SG", "value_prior": "VPE"}


def step_gain_lambda(n, k, d: int):
    """The Step Gain softmax scale lambda = sqrt(2 ln(n / k) / d) for n tokens seen, a budget of k tokens and head
    dimension d. n and k are numbers of tokens (ints or tensors, broadcast); the formula needs n > k > 0."""
    if not isinstance(d, int) or d < 1:
        raise ValueError(f"d (head dimension) must be a positive int, got {d!r}")
    if torch.is_tensor(n) or torch.is_tensor(k):
        n_t, k_t = torch.as_tensor(n, dtype=torch.float64), torch.as_tensor(k, dtype=torch.float64)
        if bool((k_t <= 0).any()) or bool((n_t <= k_t).any()):
            raise ValueError("step gain needs n > k > 0 (tokens seen above the budget)")
        return torch.sqrt(2.0 * torch.log(n_t / k_t) / d)
    if not k > 0 or not n > k:
        raise ValueError(f"step gain needs n > k > 0 (tokens seen above the budget), got n={n!r}, k={k!r}")
    return math.sqrt(2.0 * math.log(n / k) / d)


def value_prior_weights(values: torch.Tensor, valid: torch.Tensor, kernel: int) -> torch.Tensor:
    """gamma_bar: squared value norms, averaged over a 1-D window of `kernel` kept tokens, divided by their max.

    values [B, H, L, d], valid [B, H, L] (False = empty slot, excluded from the pool and set to 0) -> [B, H, L].
    """
    B, H, L, _ = values.shape
    mask = valid.float()
    energy = values.float().pow(2).sum(-1) * mask
    if kernel > 1 and L > 0:
        # mean over the valid slots of each window: sum(energy) / count(valid), both as window sums
        def window_sum(x: torch.Tensor) -> torch.Tensor:
            return F.avg_pool1d(x.reshape(-1, 1, L), kernel, stride=1, padding=kernel // 2).view(B, H, L)

        energy = window_sum(energy) / window_sum(mask).clamp_min(1.0 / kernel) * mask
    peak = energy.amax(-1, keepdim=True) if L > 0 else energy
    return energy / peak.clamp_min(torch.finfo(torch.float32).tiny)


@dataclass
class AhaKVPolicy(Policy):
    """Recent accumulation, Step Gain softmax and a value prior (see the module docstring)."""

    window: int | None = None  # protected recent tokens; None = recent_rows (the paper keeps the r most recent)
    decode_interval: int | None = 1
    recent_rows: int = 32
    recent_accumulation: bool = True
    step_gain: bool = True
    value_prior: bool = True
    pool_kernel: int = 5
    group_reduction: str = "mean"
    name = "ahakv"

    def __post_init__(self) -> None:
        if self.window is None:
            self.window = self.recent_rows
        super().__post_init__()

    def validate(self) -> None:
        self._check_count("recent_rows", minimum=1, unit="query rows")
        for part in _PARTS:
            if not isinstance(getattr(self, part), bool):
                raise ValueError(f"{part} must be True or False, got {getattr(self, part)!r}")
        self._check_count("pool_kernel", minimum=1)
        if self.pool_kernel % 2 == 0:
            raise ValueError(f"pool_kernel must be a positive odd number of tokens, got {self.pool_kernel!r}")
        if self.group_reduction not in GROUP_REDUCTIONS:
            raise ValueError(f"group_reduction must be one of {GROUP_REDUCTIONS}, got {self.group_reduction!r}")
        super().validate()

    @property
    def query_window(self) -> int:  # type: ignore[override]
        return self.recent_rows if self.recent_accumulation else 0

    @property
    def needs_attention(self) -> bool:  # type: ignore[override]
        return not self.recent_accumulation  # RA off accumulates every query row's attention as it arrives

    def variant(self) -> str:
        """Short label: 'ahakv', or the parts switched off, e.g. 'ahakv -RA -VPE'."""
        off = [short for part, short in _PARTS.items() if not getattr(self, part)]
        return " ".join(["ahakv", *(f"-{short}" for short in off)])

    def observation_key(self) -> tuple:
        # Only what changes the observations belongs here, so variants differing in score-time parts share one
        # observed prefill (ObserverSet / EvictingCache.fork). With RA off, SG enters the accumulated attention
        # and depends on the budget through k.
        observed = {"recent_accumulation": self.recent_accumulation}
        if self.recent_accumulation:
            observed["recent_rows"] = self.recent_rows
        else:
            observed["step_gain"] = self.step_gain
            if self.step_gain:
                observed.update(budget=self.budget, compression_ratio=self.compression_ratio)
        return (type(self), tuple(sorted((k, repr(v)) for k, v in observed.items())))

    # ------------------------------------------------------------------ step gain
    def _scale(self, ctx, tokens_seen: torch.Tensor) -> float | torch.Tensor:
        """Softmax scale per batch row, [B, 1, 1, 1, 1] (or the model's scale when SG is off)."""
        if not self.step_gain:
            return ctx.scaling
        budget = self.target_tokens(tokens_seen).clamp(min=1)
        above = tokens_seen > budget
        d = ctx.view.keys.shape[-1]
        # rows at or below the budget evict nothing; give the formula a valid n there and use the plain scale
        lam = step_gain_lambda(torch.where(above, tokens_seen, budget + 1), budget, d)
        scale = torch.where(above, lam, torch.full_like(lam, ctx.scaling))
        return scale.to(device=ctx.view.keys.device, dtype=torch.float32).view(-1, 1, 1, 1, 1)

    def _stat_name(self, group_head: int) -> str:
        # one channel per query head of the group; unique per observation key, so variants never add into the
        # same channel when they observe one prefill together
        tag = f"sg:{self.budget}:{self.compression_ratio}" if self.step_gain else "plain"
        return f"ahakv:{tag}:g{group_head}"

    def _group_size(self) -> int:
        config = self._cache.model_config
        return config.num_attention_heads // getattr(config, "num_key_value_heads", config.num_attention_heads)

    # ------------------------------------------------------------------ observe -> score
    def observe(self, layer_idx, ctx) -> None:
        if self.recent_accumulation:
            self._buffer_queries(layer_idx, ctx)
            return
        # RA off: every query row's attention, accumulated per query head (H2O's score, before the group reduction)
        seen_after = self._cache.tokens_seen + ctx.query_valid.sum(1)  # tokens seen once this forward is done
        scale = self._scale(ctx, seen_after)
        queries = ctx.queries
        if torch.is_tensor(scale):  # one scale per batch row: fold it into the queries
            queries, scale = queries.float() * scale, 1.0
        for g in range(queries.shape[2]):
            total = accumulated_attention(queries[:, :, g:g + 1], ctx.view.keys, ctx.query_positions,
                                          ctx.view.positions, scale, ctx.query_valid, ctx.sliding_window)
            ctx.add_stat(self._stat_name(g), total)

    def score(self, layer_idx, ctx):
        if self.recent_accumulation:
            probs = self.recent_attention(layer_idx, ctx, scale=self._scale(ctx, self._cache.tokens_seen))
            per_head = probs.sum(3)  # [B, H, G, L]: S_j over the last r rows, per query head
        else:
            per_head = torch.stack([ctx.stat(self._stat_name(g)) for g in range(self._group_size())], dim=2)
        scores = per_head.mean(2) if self.group_reduction == "mean" else per_head.amax(2)
        if self.value_prior:
            scores = scores * value_prior_weights(ctx.view.values, ctx.view.valid, self.pool_kernel)
        return scores


# ---------------------------------------------------------------------------------------------- position bias
def _variants(policy: AhaKVPolicy, budget: int) -> dict[str, Policy]:
    """h2o (with and without its recent half), `policy`'s AhaKV and each single-part ablation, at one budget."""
    from . import make_policy

    sizing = dict(budget=budget, decode_interval=None, allocation=policy.allocation, head_floor=policy.head_floor)
    own = {k: v for k, v in policy.params().items() if k not in Policy.SIZING_PARAMS}
    variants: dict[str, Policy] = {
        "h2o": make_policy("h2o", **sizing),
        "h2o recent_fraction=0": make_policy("h2o", recent_fraction=0.0, **sizing),
    }
    main = AhaKVPolicy(**own, **sizing)
    variants[main.variant()] = main
    for part in _PARTS:
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
    from ..api import prefill
    from ..cache import EvictingCache
    from .base import ObserverSet

    policy = AhaKVPolicy() if policy is None else policy
    ids = tokenizer(prompt, return_tensors="pt").input_ids.to(model.device)
    n = ids.shape[1]
    if budget is None:
        budget = policy.budget if policy.budget is not None else math.ceil(0.25 * n)
    if not 1 <= budget < n:
        raise ValueError(f"budget must be between 1 and the prompt's length - 1 ({n - 1} tokens), got {budget}")
    # the observer set binds its members to the observed cache; each fork gets fresh, equal policies
    observed = EvictingCache(model, ObserverSet(list(_variants(policy, budget).values())))
    prefill(model, observed, ids, torch.ones_like(ids), policy.prefill_chunk)
    layers = [layer.layer_idx for layer in observed.layers if layer.evictable]
    out = {"tokens": n, "budget": budget, "layers": layers, "variants": {}}
    for label, variant in _variants(policy, budget).items():
        fork = observed.fork(variant)
        fork.evict()
        kept = [p for layer in layers for p in fork.kept_positions(layer)[0]]
        out["variants"][label] = {"positions": torch.cat(kept), "window": variant.recent_window(budget)}
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


def format_table(rows: dict[str, dict]) -> str:
    head = f"{'variant':<24} {'kept/head':>9} {'2nd half':>9} {'first 10%':>9} {'2nd half, scored':>17} {'mean pos':>9}"
    lines = [head]
    for label, s in rows.items():
        lines.append(f"{label:<24} {s['kept_per_head']:>9.0f} {s['second_half']:>9.3f} {s['first_tenth']:>9.3f} "
                     f"{s['second_half_scored']:>17.3f} {s['mean_position']:>9.3f}")
    return "\n".join(lines)


def profile(model, tokenizer, prompt: str, policy: AhaKVPolicy, out_dir: Path) -> str:
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
    name = getattr(model.config, "name_or_path", "") or type(model).__name__
    plot_position_histograms({label: v["positions"].double() / n for label, v in result["variants"].items()}, path,
                             f"{name}: kept positions, {n}-token prompt, budget {budget} tokens per head",
                             protected={label: v["window"] / n for label, v in result["variants"].items()})
    return "\n".join([
        f"AhaKV position bias on {name}: {n}-token prompt, budget {budget} tokens per layer and KV head "
        f"({budget / n:.0%} of the prompt), {len(result['layers'])} evictable layers",
        format_table(rows),
        "2nd half: share of kept (layer, head, token) entries in the second half of the context (0.5 = no bias);",
        "scored: the same among tokens chosen by score, outside each variant's protected recent window.",
        f"histograms: {path}",
    ])
