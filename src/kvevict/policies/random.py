"""Random eviction: the floor any scoring method has to beat."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .base import Policy

_MOD = 2**31


def _mix(x: torch.Tensor) -> torch.Tensor:
    """One step of a linear congruential generator (values stay below 2**31, no int64 overflow)."""
    return (x * 1103515245 + 12345) % _MOD


@dataclass(frozen=True)
class RandomPolicy(Policy):
    """Pseudo-random scores, a function of (seed, layer, KV head, position) only.

    Scores do not depend on the batch a prompt runs in, so a batch evicts what each prompt would alone.
    """

    seed: int = 0
    name = "random"

    def score(self, state, layer_idx, ctx):
        pos = ctx.relative_positions()
        B, H, L = pos.shape
        head = torch.arange(H, device=pos.device).view(1, H, 1)
        x = _mix(_mix(pos + (self.seed * 7919 + layer_idx * 131 + head * 17) % _MOD) + head)
        return _mix(x).float() / _MOD
