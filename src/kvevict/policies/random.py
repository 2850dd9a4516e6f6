"""Random eviction: the floor any scoring method has to beat."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .base import Policy


@dataclass
class RandomPolicy(Policy):
    """Uniformly random scores, reproducible with `seed`."""

    seed: int = 0
    name = "random"

    def bind(self, cache) -> None:
        super().bind(cache)
        self._generator = torch.Generator().manual_seed(self.seed)

    def score(self, layer_idx, ctx):
        shape = ctx.view.positions.shape
        return torch.rand(shape, generator=self._generator).to(ctx.view.positions.device)
