"""Local window: keep the most recent tokens only (the "Local" baseline of the H2O and StreamingLLM papers)."""

from __future__ import annotations

from dataclasses import dataclass

from .base import Policy


@dataclass(frozen=True)
class WindowPolicy(Policy):
    """Keeps the last `budget` (or (1 - ratio) x seen) tokens of every head."""

    name = "window"

    def score(self, state, layer_idx, ctx):
        return ctx.view.positions.float()
