"""Knorm (Devoto et al., "A Simple and Effective L2 Norm-Based Strategy for KV Cache Compression",
arXiv 2406.11430): keys with a small L2 norm draw the most attention, so keep the smallest-norm keys."""

from __future__ import annotations

from dataclasses import dataclass

from .base import Policy


@dataclass(frozen=True)
class KnormPolicy(Policy):
    """Score = -||k||_2 (no attention needed, works with any attention kernel)."""

    name = "knorm"

    def score(self, state, layer_idx, ctx):
        return -ctx.view.keys.float().norm(dim=-1)
