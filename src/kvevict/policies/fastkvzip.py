"""Fast KVzip (Kim, Han, Yun, "Fast KVzip: Efficient and Accurate LLM Inference with Gated KV Eviction",
arXiv 2601.17668): small trained gates predict KVzip's context-reconstruction scores from the hidden states
entering each attention layer, during the very forward pass that fills the cache.

- Prefill: every new token is scored by its layer's gate (gates/sink_gate.py) as the layer reads it. After each
  prefill chunk, tokens outside the local window are thresholded jointly across all layers and KV heads
  (`allocation="global"`). Window: 4,096 tokens, or 2% of the context when it is under 16k tokens.
- Decoding: new tokens are scored the same way; every `decode_interval` (128) tokens, if the cache holds more than
  its target, the last 128 tokens are protected and the lowest scores are evicted globally.
- The first `sink_tokens` (4) tokens are always kept.
- `compression_ratio` defaults to the ratio the gates were trained for (recorded in their checkpoint).

Gates are shipped for the embedded models (gates/checkpoints/fastkvzip/<model>/); `gates=DIR` loads others.
A checkpoint made for another model is refused.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import ClassVar

import torch

from ..gates.checkpoint import shipped_gates
from ..gates.sink_gate import load_gates
from .base import Policy

KIND = "fastkvzip"


@dataclass
class FastKVzipPolicy(Policy):
    """Trained sink-attention gates score tokens as they arrive; global threshold; windowed."""

    compression_ratio: float | None = None  # None: the ratio the gates were trained for
    allocation: str = "global"
    sink_tokens: int = 4
    window: int | None = None  # None: 4,096 tokens, or 2% of the context under 16k tokens
    gates: str | None = None  # checkpoint folder; None: the gates shipped for the model
    name = "fastkvzip"
    OPTIONAL_PARAMS: ClassVar[frozenset[str]] = Policy.OPTIONAL_PARAMS | {"compression_ratio", "window"}
    _gates: object = field(default=None, init=False, repr=False, compare=False)

    @property
    def evicts(self) -> bool:
        return self.budget is not None or self.compression_ratio is None or self.compression_ratio > 0

    def describe(self) -> str:
        if self.budget is None and self.compression_ratio is None:  # not bound to a cache yet
            return f"{self.name}(trained ratio, {self.allocation})"
        return super().describe()

    def bind(self, cache) -> None:
        super().bind(cache)
        model = cache.model
        folder = self.gates or shipped_gates(KIND, getattr(model.config, "name_or_path", "") or "")
        meta, gates = load_gates(folder, model)
        self._gates = gates.to(next(model.parameters()).device)
        self.gate_meta = meta
        if self.compression_ratio is None and self.budget is None:
            if "target_ratio" not in meta["hyper"]:
                raise ValueError(f"gate checkpoint {folder} records no target_ratio in gates.json: "
                                 "give compression_ratio or budget")
            self.compression_ratio = float(meta["hyper"]["target_ratio"])
        self._pending: dict[int, torch.Tensor] = {}

    # ------------------------------------------------------------------ scoring as tokens arrive
    def wants_layer_input(self) -> bool:
        return True

    def on_layer_input(self, layer_idx, hidden_states) -> None:
        gate = self._gates[str(layer_idx)] if str(layer_idx) in self._gates else None
        if gate is None:
            return
        with torch.no_grad():
            self._pending[layer_idx] = gate(hidden_states.float()).transpose(1, 2)  # [B, H, T]

    def initial_stats(self, layer_idx, input_ids, positions):
        scores = self._pending.pop(layer_idx, None)
        return None if scores is None else {KIND: scores}

    def score(self, layer_idx, ctx):
        return ctx.stat(KIND)

    # ------------------------------------------------------------------ windows
    def recent_window(self, target: int) -> int:
        if self._cache.phase == "decode":
            return max(self.decode_interval or 0, self.window or 0)  # the paper: the newest 128 tokens score 1
        if self.window is not None:
            return self.window
        seen = int(self._cache.tokens_seen.max())
        return 4096 if seen >= 16384 else math.ceil(0.02 * seen)

    def gate_parameters(self) -> int:
        return sum(p.numel() for p in self._gates.parameters())
