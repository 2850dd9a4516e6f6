"""Attention-Gate (Zeng et al., "In-context KV-Cache Eviction for LLMs via Attention-Gate", arXiv 2410.12876).

Trained gates (kvevict.gates.attention_gate) flag, before each attention layer, which of the new tokens later
queries may see, per KV head. The flags act in-context: within the very forward that produced them, a flagged
key is hidden from every later query (each query still sees its own position), and after the forward the cache
drops exactly the flagged entries, so the memory is freed. The gate is causal, so decoded tokens are flagged
too (the paper flags prompt tokens only; flagging both is our choice): a decoded token flagged for eviction is
hidden from the next step on and leaves the storage at the next decode-time eviction (every `decode_interval`
tokens).

How much is evicted is an outcome of the trained gates, not a knob: the gates were trained toward a target ratio
(recorded in their checkpoint). `compression_ratio` therefore only declares that target: left out, it is read
from the checkpoint; given (as the evaluation harness does), it is taken as the target the gates were trained
for, and a warning says so when it differs from the checkpoint's by more than 0.05.

Gates: `gates=DIR` loads a checkpoint made by `kvevict train attention-gate`; without it the gates shipped for
the model's name are used. A checkpoint made for another model is refused (ValueError).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import torch

from .base import Policy

STAT = "ag_keep"  # per-row side channel: 1.0 = kept, 0.0 = flagged for eviction


@dataclass
class AttentionGatePolicy(Policy):
    """In-context eviction by trained Attention-Gate flags."""

    compression_ratio: float | None = None  # None: the target the gates were trained for
    gates: str | None = None  # checkpoint folder; None = the gates shipped for the model
    tau: float | None = None  # keep threshold on the gate's probability; None = the checkpoint's
    sink_tokens: int | None = None  # first tokens always kept; None = the checkpoint's
    decode_interval: int | None = 32

    name = "attention-gate"
    alters_forward = True
    OPTIONAL_PARAMS: ClassVar[frozenset[str]] = Policy.OPTIONAL_PARAMS | {"compression_ratio", "tau", "sink_tokens"}
    _gates: object = field(default=None, init=False, repr=False, compare=False)

    def validate(self) -> None:
        self._check_number("compression_ratio", 0.0, 1.0)
        if self.budget is not None:
            raise ValueError("budget: attention-gate keeps what its trained gates flag; it takes no token budget")
        if self.window:
            raise ValueError("window: attention-gate hides flagged keys in-context; it has no recent window")
        if self.allocation != "uniform" or self.head_floor is not None:
            raise ValueError("allocation/head_floor: attention-gate's per-head sizes come from its gates")
        self._check_number("tau", 0.0, 1.0, low_open=True)
        self._check_count("sink_tokens")
        self.validate_schedule()

    @property
    def evicts(self) -> bool:
        return True

    @property
    def observes(self) -> bool:
        return False  # the flags come from the layer inputs; attention itself is not observed

    # ------------------------------------------------------------------ gates
    def bind(self, cache) -> None:
        super().bind(cache)
        from ..gates.attention_gate import resolve_gates_dir

        folder = resolve_gates_dir(self.gates, cache.model)
        config, gates, meta = _load(str(Path(folder).resolve()), cache.model)
        device = next(cache.model.parameters()).device
        self._gates = gates.to(device)
        self.config = config
        self.meta = meta
        if self.compression_ratio is None:
            self.compression_ratio = config.target_ratio
        elif abs(self.compression_ratio - config.target_ratio) > 0.05:
            warnings.warn(
                f"attention-gate: compression_ratio={self.compression_ratio:g} is taken as the target of the gates in "
                f"{folder}, which were trained for {config.target_ratio:g}; they evict what they flag",
                stacklevel=2,
            )
        if self.tau is None:
            self.tau = config.tau
        if self.sink_tokens is None:
            self.sink_tokens = config.sink_tokens
        self._state: dict[int, object] = {}  # layer -> GateState (rolling gate context)
        self._pending: dict[int, torch.Tensor] = {}  # layer -> [B, H, T] flags of the forward under way

    def wants_layer_input(self) -> bool:
        return True

    def on_layer_input(self, layer_idx: int, hidden_states: torch.Tensor) -> None:
        key = str(layer_idx)
        if self._gates is None or key not in self._gates:
            return
        cache = self._cache
        B, T, _ = hidden_states.shape
        valid = cache.current_tokens_valid
        if valid is None:
            valid = torch.ones(B, T, dtype=torch.bool, device=hidden_states.device)
        with torch.no_grad():
            prob, self._state[layer_idx] = self._gates[key](hidden_states, valid, self._state.get(layer_idx))
        keep = prob >= self.tau  # [B, T, H]
        positions = torch.arange(cache.seen, cache.seen + T, device=hidden_states.device)
        sinks = positions.view(1, T) < (cache.row_start.view(B, 1).clamp(min=0) + self.sink_tokens)
        keep = keep | sinks.unsqueeze(-1)
        self._pending[layer_idx] = keep.permute(0, 2, 1).float()

    def initial_stats(self, layer_idx, input_ids, positions):
        flags = self._pending.pop(layer_idx, None)
        if flags is None:
            return None
        return {STAT: flags}

    # ------------------------------------------------------------------ in-context visibility and eviction
    def key_visibility(self, layer_idx, ctx):
        if str(layer_idx) not in (self._gates or {}):
            return None
        return ctx.stat(STAT) > 0.5

    def score(self, layer_idx, ctx):
        return ctx.stat(STAT)

    def target_tokens(self, tokens_seen: torch.Tensor) -> torch.Tensor:
        # no target to meet: the gates decide (keeps the cache's "protected tokens exceed target" check quiet)
        return tokens_seen.clone()

    def select(self, scores, positions, row_start, tokens_seen, last_position):
        """Keep exactly the flagged-to-keep entries (sink tokens were flagged to keep when they arrived)."""
        keep = {}
        for layer, score in scores.items():
            pos = positions[layer].long()
            keep[layer] = (pos >= 0) & ((score > 0.5) | (str(layer) not in self._gates))
        return keep

    def describe(self) -> str:
        ratio = "trained target" if self.compression_ratio is None else f"target={self.compression_ratio:g}"
        return f"{self.name}({ratio})"


_LOADED: dict[tuple, tuple] = {}


def _load(folder: str, model):
    """Gates of `folder` for `model`, read once per (folder, file times and sizes, model identity)."""
    from ..gates.attention_gate import load_attention_gates
    from ..models import model_identity

    # both files: an edited gates.json must be read (and checked) again
    files = [Path(folder) / "gates.safetensors", Path(folder) / "gates.json"]
    stamp = tuple((f.stat().st_mtime_ns, f.stat().st_size) if f.is_file() else None for f in files)
    identity = tuple(sorted((k, str(v)) for k, v in model_identity(model).items() if k != "name"))
    key = (folder, stamp, identity)
    if key not in _LOADED:
        if len(_LOADED) >= 4:
            _LOADED.pop(next(iter(_LOADED)))
        _LOADED[key] = load_attention_gates(folder, model)
    return _LOADED[key]
