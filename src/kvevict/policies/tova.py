"""TOVA (Oren et al., "Transformers are Multi-State RNNs", arXiv 2401.06104).

Keeps the tokens the current query attends to most, averaged over all heads of the layer, so every KV head
of a layer keeps the same tokens. The paper drops one token per step; here the cache drops down to its
target at each eviction point using the most recent query.
"""

from __future__ import annotations

from dataclasses import dataclass

from .base import Policy


@dataclass(frozen=True)
class TOVAPolicy(Policy):
    """Score = attention of the last query, mean over every query head of the layer."""

    name = "tova"
    query_window = 1

    def score(self, state, layer_idx, ctx):
        probs = state.recent_attention(layer_idx, ctx)  # [B, H, G, 1, L]
        layer_mean = probs.sum(3).mean(dim=(1, 2), keepdim=False)  # [B, L]
        return layer_mean.unsqueeze(1).expand_as(ctx.view.positions)
