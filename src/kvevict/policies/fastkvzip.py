"""Fast KVzip (Kim, Han, Yun, "Fast KVzip: Efficient and Accurate LLM Inference with Gated KV Eviction",
arXiv 2601.17668): small trained gates predict KVzip's context-reconstruction scores from the hidden states
entering each attention layer, during the very forward pass that fills the cache.

- Prefill: every new token is scored by its layer's gate (gates/sink_gate.py) as the layer reads it. After each
  prefill chunk, tokens outside the local window are thresholded jointly across all layers and KV heads
  (`allocation="global"`). Window: 4,096 tokens, or 2% of the context when it is under 16k tokens.
- Decoding: new tokens are scored the same way; every `decode_interval` (128) tokens, if the cache holds more than
  its target, the last 128 tokens are protected and the lowest scores are evicted globally. A decode step's
  gates run for every layer at once at the end of its forward (`finish_forward`), since at one token a gate costs
  the count of its operations, not their size.
- The first `sink_tokens` (4) tokens are always kept.
- `compression_ratio` defaults to the ratio the gates were trained for (recorded in their checkpoint).
- Precision (our choice): in a bfloat16/float16 model the gates' input projection runs in that dtype and the rest
  of the gate in float32 (`gate_precision="model"`, the default; "float32" computes all of it in float32). On
  smollm2 at 4k and ratio 0.7 the two kept sets differ in 0.15-0.20% of their entries; the gate runs ~2.5x faster
  on CPUs with AMX-BF16 (benchmarks/fastkvzip_gate_precision.py).

Gates are shipped for the embedded models (gates/checkpoints/fastkvzip/<model>/); `gates=DIR` loads others.
A checkpoint made for another model is refused.
"""

from __future__ import annotations

import math
import time
import weakref
from dataclasses import dataclass
from typing import ClassVar

import torch

from ..gates.checkpoint import load_once, shipped_gates
from ..gates.sink_gate import SinkGateStack, load_gates
from .base import Policy, PolicyState

KIND = "fastkvzip"
GATE_PRECISIONS = ("model", "float32")
_STACKS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # loaded gates -> {layers: SinkGateStack}


class FastKVzipState(PolicyState):
    """The loaded gates (shared by every cache of the process) and the scores of the forward under way."""

    shared = PolicyState.shared + ("gates", "gate_meta")

    def __init__(self, policy, geometry, tokenizer=None):
        super().__init__(policy, geometry, tokenizer)
        folder = policy.gates or shipped_gates(KIND, getattr(geometry.model_config, "name_or_path", "") or "")
        self.gate_meta, gates = load_once(KIND, folder, geometry.model_config, load_gates)
        self.gates = gates.to(geometry.device)
        if policy.compression_ratio is None and policy.budget is None and "target_ratio" not in self.gate_meta["hyper"]:
            raise ValueError(f"gate checkpoint {folder} records no target_ratio in gates.json: "
                             "give compression_ratio or budget")
        self.pending: dict[int, torch.Tensor] = {}
        self.deferred: tuple | None = None  # (forward, {layer: its input hidden state}) of a decode step
        self.gate_seconds = 0.0  # wall time spent in the gates (what `python -m kvevict.bench --compare` reports)

    @property
    def compression_ratio(self) -> float:
        if self.policy.compression_ratio is None and self.policy.budget is None:
            return float(self.gate_meta["hyper"]["target_ratio"])  # the ratio the gates were trained for
        return self.policy.compression_ratio or 0.0

    # ------------------------------------------------------------------ scoring as tokens arrive
    def wants_layer_input(self) -> bool:
        return True

    def on_layer_input(self, layer_idx, hidden_states, forward) -> None:
        gate = self.gates[str(layer_idx)] if str(layer_idx) in self.gates else None
        if gate is None:
            return
        if hidden_states.shape[1] == 1 and forward.all_valid and forward.finishes:
            # a decoded token's score is read at the next eviction only: every layer's gate runs together at the
            # forward's end (`finish_forward`), one set of batched operations instead of one per layer
            if self.deferred is None or self.deferred[0] is not forward:
                self.deferred = (forward, {})
            self.deferred[1][layer_idx] = hidden_states
            return
        started = time.perf_counter()
        with torch.no_grad():
            scores = gate(hidden_states, model_precision=self.policy.gate_precision == "model")
            self.pending[layer_idx] = scores.transpose(1, 2)  # [B, H, T]
        self.gate_seconds += time.perf_counter() - started

    def initial_stats(self, layer_idx, forward):
        scores = self.pending.pop(layer_idx, None)
        return None if scores is None else {KIND: scores}  # a deferred layer's score is written at the end

    def finish_forward(self, forward, stores) -> None:
        if self.deferred is None or self.deferred[0] is not forward:
            return
        hidden, self.deferred = self.deferred[1], None
        started = time.perf_counter()
        layers = tuple(hidden)
        stacks = _STACKS.setdefault(self.gates, {})
        if layers not in stacks:
            stacks[layers] = SinkGateStack([self.gates[str(layer)] for layer in layers])
        states = torch.stack([hidden[layer] for layer in layers])  # [L, B, 1, D]
        with torch.no_grad():
            scores = stacks[layers].scores(states.flatten(1, 2), self.policy.gate_precision == "model").contiguous()
        name = self.channel_prefix + KIND
        for i, layer in enumerate(layers):  # [B, H] per layer: the rows the forward appended, segment by segment
            stores[layer].stat_channel(name).index_copy_(0, stores[layer].appended_rows, scores[i].view(-1))
        self.gate_seconds += time.perf_counter() - started

    def score(self, layer_idx, ctx):
        return ctx.stat(KIND)

    # ------------------------------------------------------------------ windows
    def recent_window(self, target, eviction) -> int:
        policy = self.policy
        if eviction.phase == "decode":
            return max(policy.decode_interval or 0, policy.window or 0)  # the paper: the newest 128 tokens score 1
        if policy.window is not None:
            return policy.window
        seen = int(eviction.tokens_seen.max())
        return 4096 if seen >= 16384 else math.ceil(0.02 * seen)

    def describe(self) -> str:
        size = f"budget={self.budget}" if self.budget is not None else f"ratio={self.compression_ratio:g}"
        return f"{self.policy.name}({size}, {self.policy.allocation})"

    def gate_parameters(self) -> int:
        return sum(p.numel() for p in self.gates.parameters())


@dataclass(frozen=True)
class FastKVzipPolicy(Policy):
    """Trained sink-attention gates score tokens as they arrive; global threshold; windowed."""

    compression_ratio: float | None = None  # None: the ratio the gates were trained for
    allocation: str = "global"
    sink_tokens: int = 4
    window: int | None = None  # None: 4,096 tokens, or 2% of the context under 16k tokens
    gates: str | None = None  # checkpoint folder; None: the gates shipped for the model
    # "model": the gates' input projection runs in the model's dtype when it is 16-bit (the rest in float32);
    # "float32": all of the gate in float32
    gate_precision: str = "model"
    name = "fastkvzip"
    State = FastKVzipState
    OPTIONAL_PARAMS: ClassVar[frozenset[str]] = Policy.OPTIONAL_PARAMS | {"compression_ratio", "window"}

    def validate(self) -> None:
        super().validate()
        if self.gate_precision not in GATE_PRECISIONS:
            raise ValueError(f"gate_precision must be one of {GATE_PRECISIONS}, got {self.gate_precision!r}")

    def describe(self) -> str:
        if self.budget is None and self.compression_ratio is None:  # the gates' own ratio, known once started
            return f"{self.name}(trained ratio, {self.allocation})"
        return super().describe()
