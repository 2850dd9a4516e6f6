"""StreamingLLM (Xiao et al., "Efficient Streaming Language Models with Attention Sinks", arXiv 2309.17453).

Keeps the first `sink_tokens` tokens (attention sinks, 4 in the paper) plus the most recent ones.
"""

from __future__ import annotations

from dataclasses import dataclass

from .base import Policy


@dataclass(frozen=True)
class StreamingLLMPolicy(Policy):
    """Attention sinks + recent window."""

    sink_tokens: int = 4
    name = "streamingllm"

    def score(self, state, layer_idx, ctx):
        return ctx.view.positions.float()
