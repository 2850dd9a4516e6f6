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
(1 - ratio). Cost: a repeat pass over the whole context whose queries attend to all of it, plus the scoring
softmax - about 2x the prefill in the paper (GPU); far more on CPU for small models, where attention dominates
(docs/BENCHMARKS.md).

Choices where the paper leaves room (parameters): the protected prefix is the chat template's opening (system
turn) when the context starts with it, and at least `sink_tokens`; tokens decoded later are scored by the same
repeat pass, `decode_interval` tokens at a time. Scores one sequence at a time (batch size 1).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..attention import allowed_keys
from ..chat import has_template, user_turn
from .base import Policy, PolicyState

FIRST_PROMPT = "\n\nRepeat the previous context exactly."
LATER_PROMPT = "\n\nRepeat the part of the previous context exactly, starting with "
_QUERY_BLOCK = 256


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
        kpos = ctx.view.positions.long()
        # keys the scoring softmax runs over: protected prefix, this chunk, the repeat tokens themselves
        in_chunk = (kpos >= start) & (kpos < stop)
        subset = (kpos >= 0) & ((kpos < self.protected) | in_chunk | (kpos >= repeat_start))
        best = torch.full(kpos.shape, float("-inf"), dtype=torch.float32, device=kpos.device)
        q = ctx.queries.float()
        keys = ctx.view.keys.float()
        for b0 in range(0, q.shape[3], _QUERY_BLOCK):
            qb, pos = q[..., b0:b0 + _QUERY_BLOCK, :], ctx.query_positions[b0:b0 + _QUERY_BLOCK]
            logits = torch.einsum("bhgtd,bhld->bhgtl", qb, keys).mul_(ctx.scaling)
            visible = allowed_keys(pos, ctx.view.positions) & subset.unsqueeze(2)
            logits.masked_fill_(~visible.unsqueeze(2), float("-inf"))
            # max_t softmax_t(j) = exp(max_t (logit_tj - logsumexp_t)): no full softmax needed
            logits.sub_(torch.logsumexp(logits, dim=-1, keepdim=True))
            best = torch.maximum(best, logits.amax(dim=(2, 3)))
        scores = best.exp()
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
    tokenizer: object = field(default=None, repr=False, compare=False)
    name = "kvzip"
    State = KVzipState

    def validate(self) -> None:
        super().validate()
        self._check_count("chunk_size", minimum=16)
        self._check_count("prompt_overlap")
