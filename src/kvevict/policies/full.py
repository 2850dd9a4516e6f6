"""No eviction: the reference every method is compared against."""

from __future__ import annotations

from dataclasses import dataclass

from .base import Policy


@dataclass(frozen=True)
class FullPolicy(Policy):
    """Keeps every token. Logits match transformers' DynamicCache exactly."""

    name = "full"

    def validate(self) -> None:
        super().validate()
        if self.evicts:
            raise ValueError("the full policy keeps everything: compression_ratio must be 0 and budget None")

    def score(self, state, layer_idx, ctx):
        return ctx.view.positions.float()
