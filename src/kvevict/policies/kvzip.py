"""KVzip (Kim et al., "KVzip: Query-Agnostic KV Cache Compression with Context Reconstruction",
arXiv 2505.23416): a KV pair matters as much as the model attends to it when asked to repeat the context.

After the context is prefilled, it is split into chunks of ~`chunk_size` tokens. Each chunk gets a temporary
forward pass (removed from the cache afterwards) over a repeat prompt:
    chunk 1:  "\\n\\nRepeat the previous context exactly." + assistant prefix + chunk tokens
    chunk k:  "\\n\\nRepeat the part of the previous context exactly, starting with " + last 8 tokens of chunk k-1
              + assistant prefix + chunk tokens
In every layer the repeat queries' attention is taken with a softmax over [protected prefix keys; the chunk's
keys; the repeat tokens' own keys (causal)], and a key's score is the maximum over the repeat positions and the
query heads of its GQA group. One threshold over all layers and heads (`allocation="global"`) keeps the top
(1 - ratio). Cost: a repeat pass over the whole context whose queries attend to all of it (the forward must see
the context to reconstruct it), plus the scoring, which builds only the chunk's columns of the attention map
(`repeat_scores`) - about 2x the prefill in the paper (GPU); more on CPU for small models, where attention
dominates (docs/BENCHMARKS.md).

Choices where the paper leaves room (parameters): the protected prefix is the chat template's opening (system
turn) when the context starts with it, and at least `sink_tokens`; tokens decoded later are scored by the same
repeat pass, `decode_interval` tokens at a time; in a 16-bit model on CPU the scores' products run in the model's
dtype (`score_precision="model"`, the default; "float32" computes them in float32). Scores one sequence at a time
(batch size 1).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..attention import FUSED_CPU
from ..chat import has_template, user_turn
from .base import Policy, PolicyState

FIRST_PROMPT = "\n\nRepeat the previous context exactly."
LATER_PROMPT = "\n\nRepeat the part of the previous context exactly, starting with "
_QUERY_BLOCK = 256
_BLOCK_ELEMENTS = 2**24  # logits per block of repeat rows in the scoring (64 MiB in float32)
SCORE_PRECISIONS = ("model", "float32")


_MARKER = "\x00USER\x00"


def assistant_prefix(tokenizer) -> str:
    """What the chat template puts between a user turn and the model's answer ("\\n" without a template)."""
    return user_turn(tokenizer, _MARKER).split(_MARKER, 1)[1] if has_template(tokenizer) else "\n"


def template_opening(tokenizer) -> list[int]:
    """Token ids the chat template puts before the first user text (its system turn), [] without a template."""
    if not has_template(tokenizer):
        return []
    return tokenizer(user_turn(tokenizer, _MARKER).split(_MARKER, 1)[0], add_special_tokens=False).input_ids


class KVzipState(PolicyState):
    """Every token id seen (batch of one), how far the repeat passes have scored, and the protected prefix."""

    def __init__(self, policy, geometry, tokenizer=None):
        super().__init__(policy, geometry, tokenizer)
        self.token_ids: list[torch.Tensor] = []  # every token id seen, in order
        self.scored_upto = 0  # positions below this one have been scored
        self.protected = policy.sink_tokens  # never-evicted prefix (grows to the template's system turn)
        self.probe: tuple[int, int, int] | None = None  # (chunk start, chunk end, repeat start) during a pass
        self.first_layer = geometry.evictable_layers[0] if geometry.evictable_layers else None

    @property
    def observes(self) -> bool:
        return True

    # ------------------------------------------------------------------ recording and observing
    def initial_stats(self, layer_idx, forward):
        if self.probe is not None or layer_idx != self.first_layer:
            return None
        if forward.input_ids is None:
            raise ValueError("kvzip needs token ids (input_ids), not inputs_embeds")
        if forward.input_ids.shape[0] != 1:
            raise ValueError("kvzip scores one sequence at a time: use batch size 1")
        self.token_ids.append(forward.input_ids[0].detach().cpu())
        return None

    def observe(self, layer_idx, ctx) -> None:
        if self.probe is None:
            return
        start, stop, repeat_start = self.probe
        kpos = ctx.view.positions
        in_chunk = (kpos >= start) & (kpos < stop)
        scores = repeat_scores(ctx.queries, ctx.view.keys, kpos, ctx.query_positions, ctx.scaling, self.protected,
                               (start, stop), repeat_start, model_precision=self.policy.score_precision == "model",
                               new_tokens_lse=ctx.new_tokens_lse)
        ctx.set_stat("kvzip", torch.where(in_chunk, scores, ctx.stat("kvzip")))

    # ------------------------------------------------------------------ scoring passes
    def prepare_eviction(self, eviction) -> None:
        """Run repeat passes over every token not scored yet (the prompt, later each batch of decoded tokens)."""
        seen = eviction.seen
        if seen <= self.scored_upto:
            return
        if eviction.batch != 1:
            raise ValueError("kvzip scores one sequence at a time: use batch size 1")
        tokenizer = self.tokenizer
        if tokenizer is None:
            raise ValueError("kvzip needs the tokenizer: make_policy('kvzip', tokenizer=tok) (kvevict.generate and "
                             "kvevict.answer pass it)")
        ids = torch.cat(self.token_ids)
        opening = template_opening(tokenizer)
        has_opening = len(opening) > 0 and ids[: len(opening)].tolist() == opening
        self.protected = max(self.policy.sink_tokens, len(opening) if has_opening else 0)
        prefix = tokenizer(assistant_prefix(tokenizer), add_special_tokens=False).input_ids
        chunk_start = max(self.scored_upto, self.protected)
        while chunk_start < seen:
            chunk_stop = min(seen, chunk_start + self.policy.chunk_size)
            if chunk_start == self.protected:
                lead = tokenizer(FIRST_PROMPT, add_special_tokens=False).input_ids
            else:
                quoted = tokenizer.decode(ids[max(0, chunk_start - self.policy.prompt_overlap):chunk_start])
                lead = tokenizer(LATER_PROMPT + quoted, add_special_tokens=False).input_ids
            repeat = torch.tensor([lead + prefix + ids[chunk_start:chunk_stop].tolist()], device=self.geometry.device)
            self.probe = (chunk_start, chunk_stop, seen)
            try:
                eviction.replay(repeat, self)
            finally:
                self.probe = None
            chunk_start = chunk_stop
        self.scored_upto = seen

    def protected_prefix(self) -> int:
        return self.protected

    def score(self, layer_idx, ctx):
        return ctx.stat("kvzip")


@dataclass(frozen=True)
class KVzipPolicy(Policy):
    """Context-reconstruction scores (max attention of a repeat pass), global threshold by default."""

    allocation: str = "global"
    sink_tokens: int = 4
    chunk_size: int = 2000
    prompt_overlap: int = 8  # tokens of the previous chunk quoted in a later chunk's repeat prompt
    # "model": in a 16-bit model on CPU the scoring's products take the model's dtype (float32 accumulation, one
    # rounding per score); "float32": every product in float32
    score_precision: str = "model"
    tokenizer: object = field(default=None, repr=False, compare=False)
    name = "kvzip"
    State = KVzipState

    def validate(self) -> None:
        super().validate()
        self._check_count("chunk_size", minimum=16)
        self._check_count("prompt_overlap")
        if self.score_precision not in SCORE_PRECISIONS:
            raise ValueError(f"score_precision must be one of {SCORE_PRECISIONS}, got {self.score_precision!r}")


def _slots(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The slots where mask [B, H, L] is True, in slot order, padded per head: (index [B, H, C], filled [B, H, C])."""
    count = mask.sum(-1)
    width = int(count.max()) if count.numel() else 0
    index = torch.argsort((~mask).to(torch.uint8), dim=-1, stable=True)[..., :width]
    return index, torch.arange(width, device=mask.device) < count.unsqueeze(-1)


def _causal_lse(queries: torch.Tensor, keys: torch.Tensor, scale: float) -> torch.Tensor:
    """log-sum-exp over keys j <= t of scale * q_t.k_j: queries [B, H, G, T, d], keys [B, H, T, d] -> [B, H, G, T].

    The fused CPU kernel never stores the T x T map; elsewhere the map is built a block of rows at a time."""
    B, H, G, T, d = queries.shape
    if queries.device.type == "cpu" and FUSED_CPU:
        q = queries.reshape(B, H * G, T, d)
        k = keys.repeat_interleave(G, dim=1)
        _, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, k, 0.0, True, scale=scale)[:2]
        return lse.view(B, H, G, T)
    out = torch.empty(B, H, G, T, dtype=torch.float32, device=queries.device)
    rows = torch.arange(T, device=queries.device)
    for b0 in range(0, T, _QUERY_BLOCK):
        b1 = min(T, b0 + _QUERY_BLOCK)
        logits = torch.einsum("bhgtd,bhld->bhgtl", queries[..., b0:b1, :], keys[:, :, :b1]).mul_(scale)
        logits.masked_fill_(rows[:b1].view(1, -1) > rows[b0:b1].view(-1, 1), float("-inf"))
        out[..., b0:b1] = torch.logsumexp(logits, dim=-1)
    return out


def repeat_scores(
    queries: torch.Tensor,
    keys: torch.Tensor,
    key_positions: torch.Tensor,
    query_positions: torch.Tensor,
    scale: float,
    protected: int,
    chunk: tuple[int, int],
    repeat_start: int,
    model_precision: bool = False,
    new_tokens_lse: torch.Tensor | None = None,
) -> torch.Tensor:
    """KVzip's score of every chunk key: max over the repeat queries and the G heads of a group of the attention
    probability, the softmax running over [protected prefix; chunk; repeat tokens (causal)] only: [B, H, L] fp32
    (values outside the chunk are meaningless).

    queries [B, H, G, T, d] are the repeat tokens (positions [T], from `repeat_start`), keys [B, H, L, d] the
    layer's view with key_positions [B, H, L] (-1 = empty slot). Only the chunk's columns of the map are built, a
    block of rows at a time; the repeat tokens' share of each row's normaliser comes from a fused causal kernel.
    max_t softmax_t(j) = exp(max_t (logit_tj - lse_t)), so no probability map is needed either.

    `model_precision`: with 16-bit queries on CPU, the products run in their dtype (accumulating in float32) and
    pick each key's best row, where its score is recomputed in float32 (`_max_shifted_logits`); elsewhere, or when
    False, all in float32. `new_tokens_lse` [B, H, G, T]: the repeat tokens' causal log-sum-exps over themselves,
    if the layer's attention computed them already (`LayerContext.new_tokens_lse`); used when the scoring runs in
    the queries' own dtype, where it is what the fused kernel would compute here.
    """
    B, H, G, T, d = queries.shape
    start, stop = chunk
    fused = queries.device.type == "cpu" and FUSED_CPU
    low = model_precision and fused and queries.dtype in (torch.float16, torch.bfloat16)
    q = queries if low else queries.float()
    context = (key_positions >= 0) & ((key_positions < protected) | ((key_positions >= start) & (key_positions < stop)))
    repeat = key_positions >= repeat_start
    rep_index, rep_filled = _slots(repeat)
    rep_keys = keys.gather(2, rep_index.unsqueeze(-1).expand(-1, -1, -1, d)).to(q.dtype)
    rep_pos = key_positions.gather(2, rep_index)
    if bool(rep_filled.all()) and rep_pos.shape[-1] == T and bool((rep_pos == query_positions.view(1, 1, -1)).all()):
        reuse = new_tokens_lse is not None and q.dtype == queries.dtype and fused
        rep_lse = new_tokens_lse if reuse else _causal_lse(q, rep_keys, scale)
    else:  # not the layout a replay leaves (every head holding all repeat tokens): mask by positions
        visible = rep_filled.unsqueeze(2) & (rep_pos.unsqueeze(2) <= query_positions.view(1, 1, -1, 1))
        logits = torch.einsum("bhgtd,bhld->bhgtl", q.float(), rep_keys.float()).mul_(scale)
        rep_lse = logits.masked_fill_(~visible.unsqueeze(2), float("-inf")).logsumexp(-1)
    ctx_index, ctx_filled = _slots(context)
    ctx_keys = keys.gather(2, ctx_index.unsqueeze(-1).expand(-1, -1, -1, d)).to(q.dtype)
    C = ctx_index.shape[-1]
    all_filled = bool(ctx_filled.all())
    if all_filled and fused:  # the group's queries side by side, no mask
        _, ctx_lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            q.reshape(B, H, G * T, d), ctx_keys, ctx_keys, 0.0, False, scale=scale)[:2]
        lse = torch.logaddexp(ctx_lse.view(B, H, G, T), rep_lse)
    else:
        lse = None
    if low and lse is not None:
        best = _max_shifted_logits(q, ctx_keys, lse, scale)
    else:
        q, ctx_keys = q.float(), ctx_keys.float()
        best = torch.full(ctx_index.shape, float("-inf"), device=keys.device)
        rows = max(16, _BLOCK_ELEMENTS // max(1, B * H * G * C))
        keys_t = ctx_keys.transpose(-1, -2).unsqueeze(2)  # [B, H, 1, d, C]
        for b0 in range(0, T, rows):
            logits = torch.matmul(q[..., b0:b0 + rows, :], keys_t).mul_(scale)  # [B, H, G, t, C]
            if not all_filled:
                logits.masked_fill_(~ctx_filled[:, :, None, None, :], float("-inf"))
            block_lse = lse[..., b0:b0 + rows] if lse is not None else torch.logaddexp(
                torch.logsumexp(logits, dim=-1), rep_lse[..., b0:b0 + rows])
            best = torch.maximum(best, logits.sub_(block_lse.unsqueeze(-1)).amax(dim=(2, 3)))
    out = torch.zeros(key_positions.shape, dtype=torch.float32, device=keys.device)
    return out.scatter_(-1, ctx_index, torch.where(ctx_filled, best.exp(), 0.0))


def _max_shifted_logits(queries: torch.Tensor, keys: torch.Tensor, lse: torch.Tensor, scale: float) -> torch.Tensor:
    """max over the G heads and T rows of scale * q_t.k_j - lse_t, for every key: [B, H, C] fp32.

    queries [B, H, G, T, d] and keys [B, H, C, d] in a 16-bit dtype, lse [B, H, G, T] fp32. One product per block
    in the queries' dtype finds each key's best row: k' = [k, 1, 1] against q' = [q, -hi, -lo], where hi + lo =
    lse / scale (split so that the shift keeps float32's precision), accumulated in float32 and rounded once to the
    16-bit dtype. The value returned is then recomputed in float32 at that row: it differs from the float32 max
    only where another row came within that rounding of it. Keys come first so that the max runs along
    contiguous rows."""
    B, H, G, T, d = queries.shape
    C = keys.shape[2]
    q_flat = queries.reshape(B * H, G * T, d)
    k_flat = keys.reshape(B * H, C, d)
    lse_flat = lse.reshape(B * H, G * T)
    shift = (lse_flat / scale).unsqueeze(-1)
    hi = shift.to(queries.dtype)
    lo = (shift - hi.float()).to(queries.dtype)
    q_aug = torch.cat([q_flat, -hi, -lo], dim=-1)  # [BH, GT, d + 2]
    k_aug = torch.cat([k_flat, keys.new_ones(B * H, C, 2)], dim=-1)  # [BH, C, d + 2]
    best = row = None
    rows = max(16, _BLOCK_ELEMENTS // max(1, B * H * C))
    for r0 in range(0, G * T, rows):
        value, index = torch.bmm(k_aug, q_aug[:, r0:r0 + rows].transpose(1, 2)).max(dim=-1)  # [BH, C]
        if best is None:
            best, row = value, index
        else:
            better = value > best
            best, row = torch.where(better, value, best), torch.where(better, index + r0, row)
    q_best = q_flat.gather(1, row.unsqueeze(-1).expand(-1, -1, d)).float()  # [BH, C, d]
    exact = (q_best * k_flat.float()).sum(-1).mul_(scale) - lse_flat.gather(1, row)
    return exact.view(B, H, C)
