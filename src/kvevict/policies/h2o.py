"""H2O (Zhang et al., "H2O: Heavy-Hitter Oracle for Efficient Generative Inference of LLMs", arXiv 2306.14048).

Score = attention each key has received, accumulated over every query so far (prompt and decoded tokens),
summed over the query heads of a GQA group. Half of the budget goes to the most recent tokens (the paper's
equal heavy-hitter / recent split, `recent_fraction`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

from ..attention import accumulated_attention
from .base import Policy, PolicyState


class H2OState(PolicyState):
    def observe(self, layer_idx, ctx):
        acc = accumulated_attention(
            ctx.queries, ctx.view.keys, ctx.query_positions, ctx.view.positions, ctx.scaling,
            ctx.query_valid, ctx.sliding_window, lse=ctx.attention_lse,
        )
        ctx.add_stat("h2o", acc)

    def recent_window(self, target, eviction):
        return max(self.policy.window, math.floor(self.policy.recent_fraction * target))


@dataclass(frozen=True)
class H2OPolicy(Policy):
    """Heavy hitters by accumulated attention + a recent window."""

    recent_fraction: float = 0.5
    name = "h2o"
    State = H2OState
    SIZING_PARAMS: ClassVar[frozenset[str]] = Policy.SIZING_PARAMS | {"recent_fraction"}

    def validate(self) -> None:
        super().validate()
        self._check_number("recent_fraction", 0.0, 1.0)

    def score(self, state, layer_idx, ctx):
        return ctx.stat("h2o")
