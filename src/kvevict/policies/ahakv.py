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

import torch
import torch.nn.functional as F

from ..attention import accumulated_attention
from .base import Policy, PolicyState

GROUP_REDUCTIONS = ("mean", "max")
PARTS = {"recent_accumulation": "RA", "step_gain": "SG", "value_prior": "VPE"}


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


def attention_stat(group_head: int) -> str:
    """Side channel of one query head of the group: attention accumulated over every query row (RA off). Each
    observing state has its own namespace, and variants that share one observe the same, so no sizing tag."""
    return f"ahakv:g{group_head}"


class AhaKVState(PolicyState):
    """What one cache observed: the last r queries (RA) or the accumulated attention of every row (RA off)."""

    def softmax_scale(self, ctx, tokens_seen: torch.Tensor) -> float | torch.Tensor:
        """Softmax scale per batch row, [B, 1, 1, 1, 1] (or the model's scale when SG is off)."""
        if not self.policy.step_gain:
            return ctx.scaling
        budget = self.target_tokens(tokens_seen).clamp(min=1)
        above = tokens_seen > budget
        d = ctx.view.keys.shape[-1]
        # rows at or below the budget evict nothing; give the formula a valid n there and use the plain scale
        lam = step_gain_lambda(torch.where(above, tokens_seen, budget + 1), budget, d)
        scale = torch.where(above, lam, torch.full_like(lam, ctx.scaling))
        return scale.to(device=ctx.view.keys.device, dtype=torch.float32).view(-1, 1, 1, 1, 1)

    def observe(self, layer_idx, ctx) -> None:
        if self.policy.recent_accumulation:
            self._buffer_queries(layer_idx, ctx)
            return
        # RA off: every query row's attention, accumulated per query head (H2O's score, before the group reduction)
        seen_after = ctx.tokens_seen + ctx.query_valid.sum(1)  # tokens seen once this forward is done
        scale = self.softmax_scale(ctx, seen_after)
        queries = ctx.queries
        if torch.is_tensor(scale):  # one scale per batch row: fold it into the queries
            queries, scale = queries.float() * scale, 1.0
        for g in range(queries.shape[2]):
            total = accumulated_attention(queries[:, :, g:g + 1], ctx.view.keys, ctx.query_positions,
                                          ctx.view.positions, scale, ctx.query_valid, ctx.sliding_window)
            ctx.add_stat(attention_stat(g), total)


@dataclass(frozen=True)
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
    State = AhaKVState

    def __post_init__(self) -> None:
        if self.window is None:
            object.__setattr__(self, "window", self.recent_rows)  # frozen: set once, here
        super().__post_init__()

    def validate(self) -> None:
        self._check_count("recent_rows", minimum=1, unit="query rows")
        for part in PARTS:
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

    def variant(self) -> str:
        """Short label: 'ahakv', or the parts switched off, e.g. 'ahakv -RA -VPE'."""
        off = [short for part, short in PARTS.items() if not getattr(self, part)]
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

    def score(self, state, layer_idx, ctx):
        if self.recent_accumulation:
            probs = state.recent_attention(layer_idx, ctx, scale=state.softmax_scale(ctx, ctx.tokens_seen))
            per_head = probs.sum(3)  # [B, H, G, L]: S_j over the last r rows, per query head
        else:
            group = state.geometry.group_size
            per_head = torch.stack([ctx.stat(attention_stat(g)) for g in range(group)], dim=2)
        scores = per_head.mean(2) if self.group_reduction == "mean" else per_head.amax(2)
        if self.value_prior:
            scores = scores * value_prior_weights(ctx.view.values, ctx.view.valid, self.pool_kernel)
        return scores
