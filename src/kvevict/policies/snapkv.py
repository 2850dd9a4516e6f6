"""SnapKV (Li et al., "SnapKV: LLM Knows What You are Looking for Before Generation", arXiv 2404.14469).

Score = attention of the last `observation_window` queries (the paper: 32-64), averaged over those queries,
smoothed with a 1-D average pool (kernel 5-7) and averaged over the GQA group. The observation window itself
is always kept. While decoding, the window is the most recent decoded queries.
"""

from __future__ import annotations

from dataclasses import dataclass

from .base import Policy, pool1d


@dataclass(frozen=True)
class SnapKVPolicy(Policy):
    """Observation-window attention, pooled."""

    window: int = 64
    observation_window: int = 64
    kernel_size: int = 5
    name = "snapkv"

    @property
    def query_window(self) -> int:  # type: ignore[override]
        return self.observation_window

    def validate(self) -> None:
        super().validate()
        self._check_count("observation_window", minimum=1, unit="queries")
        self._check_count("kernel_size", minimum=1)
        if self.kernel_size % 2 == 0:
            raise ValueError(f"kernel_size must be a positive odd number, got {self.kernel_size!r}")

    def score(self, state, layer_idx, ctx):
        probs = state.recent_attention(layer_idx, ctx)  # [B, H, G, w, L]
        per_query = probs.mean(dim=3)  # [B, H, G, L]
        return pool1d(per_query, self.kernel_size).mean(dim=2)
