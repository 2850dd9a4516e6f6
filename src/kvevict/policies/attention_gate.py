"""Attention-Gate (Zeng et al., "In-context KV-Cache Eviction for LLMs via Attention-Gate", arXiv 2410.12876).

Trained gates (kvevict.gates.attention_gate) flag, before each attention layer, which of the new tokens later
queries may see, per KV head. The flags act in-context: within the very forward that produced them, a flagged
key is hidden from every later query (each query still sees its own position), and after the forward the cache
drops exactly the flagged entries, so the memory is freed. The gate is causal, so decoded tokens are flagged
too (the paper flags prompt tokens only; flagging both is our choice): a decoded token flagged for eviction is
hidden from the next step on and leaves the storage at the next decode-time eviction (every `decode_interval`
tokens).

How much is evicted is an outcome of the trained gates, not a knob: the gates were trained toward a target ratio
(recorded in their checkpoint). `target=` picks among the checkpoints shipped for the model by that ratio
(default 0.5, shipped for every model with gates); `compression_ratio` only declares the target: left out, it
is the target of the gates used (`policy.compression_ratio` reports it from `make_policy` on); given (as the
evaluation harness does) without `target`, the shipped gates trained for that ratio are used if there are any,
else the default ones, with a warning when their target differs by more than 0.05.

Gates: `gates=DIR` loads a checkpoint made by `kvevict train attention-gate`; without it the gates shipped for
the model's name are used. A checkpoint made for another model is refused (ValueError).
"""

from __future__ import annotations

import warnings
import weakref
from dataclasses import dataclass
from typing import ClassVar

import torch

from .base import Policy, PolicyState

STAT = "ag_keep"  # per-row side channel: 1.0 = kept, 0.0 = flagged for eviction
_STACKS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # loaded gates -> {layers: GateStack}


class AttentionGateState(PolicyState):
    """The loaded gates (shared by every cache of the process), their rolling per-layer context, pending flags."""

    shared = PolicyState.shared + ("gates", "config", "meta")

    def __init__(self, policy, geometry, tokenizer=None):
        super().__init__(policy, geometry, tokenizer)
        from ..gates.attention_gate import (
            load_attention_gates,
            resolve_gates_dir,
            shipped_targets,
        )
        from ..gates.checkpoint import load_once

        target = policy.target
        if target is None and policy.gates is None:
            # no target named: the shipped gates trained for the declared ratio, if any (else the default ones)
            name = getattr(geometry.model_config, "name_or_path", "") or ""
            if any(abs(r - (policy.compression_ratio or -1.0)) < 1e-6 for r in shipped_targets(name)):
                target = policy.compression_ratio
        folder = resolve_gates_dir(policy.gates, geometry.model_config, target)
        self.config, gates, self.meta = load_once("attention-gate", folder, geometry.model_config,
                                                  load_attention_gates)
        self.gates = gates.to(geometry.device)
        if self.config.recent_window > 1:
            raise ValueError(f"attention-gate: the gates in {folder} were trained with recent_window="
                             f"{self.config.recent_window} (a flagged key stays visible to that many queries); the "
                             "cache applies flags at once only. benchmarks/attention_gate_recent_window.py "
                             "evaluates such gates")
        if policy.compression_ratio is not None and abs(policy.compression_ratio - self.config.target_ratio) > 0.05:
            warnings.warn(
                f"attention-gate: compression_ratio={policy.compression_ratio:g} is taken as the target of the gates "
                f"in {folder}, which were trained for {self.config.target_ratio:g}; they evict what they flag",
                stacklevel=4,
            )
        self.tau = self.config.tau if policy.tau is None else policy.tau
        self.sink_tokens = self.config.sink_tokens if policy.sink_tokens is None else policy.sink_tokens
        self.gate_context: dict[int, object] = {}  # layer -> GateState (rolling gate context across forwards)
        self.stacked: tuple | None = None  # (layers, their GateStates stacked) while decoding
        self.pending: dict[int, torch.Tensor] = {}  # layer -> [B, H, T] flags of the forward under way
        self.deferred: dict[int, torch.Tensor] = {}  # layer -> its input hidden state, gate run at the forward's end
        self.forward = None  # the forward under way
        self.sinks: torch.Tensor | None = None  # [B, T, 1] bool: its sink tokens (None: it has none)

    @property
    def compression_ratio(self) -> float:
        return self.config.target_ratio if self.policy.compression_ratio is None else self.policy.compression_ratio

    @property
    def evicts(self) -> bool:
        return True

    @property
    def observes(self) -> bool:
        return False  # the flags come from the layer inputs; attention itself is not observed

    def protected_prefix(self) -> int:
        return self.sink_tokens

    def wants_layer_input(self) -> bool:
        return True

    def on_layer_input(self, layer_idx, hidden_states, forward) -> None:
        key = str(layer_idx)
        if key not in self.gates:
            return
        B, T, _ = hidden_states.shape
        if self.forward is not forward:  # what every layer of a forward shares: found once
            self.forward, self.deferred = forward, {}
            sinks = forward.positions.view(1, T) < (forward.row_start.view(B, 1).clamp(min=0) + self.sink_tokens)
            # one host check per forward spares every layer a mask operation once decoding is past the sinks
            has_sinks = forward.seen < self.sink_tokens or bool(sinks.any())
            self.sinks = sinks.unsqueeze(-1) if has_sinks else None
        if T == 1 and forward.all_valid and forward.finishes and self._window_full(layer_idx):
            # a decoded token's own flag is not needed within its forward (its query sees its own key): the gates
            # of every layer run together at the forward's end (`finish_forward`)
            self.deferred[layer_idx] = hidden_states
            return
        with torch.no_grad():
            prob, self.gate_context[layer_idx] = self.gates[key](
                hidden_states, None if forward.all_valid else forward.valid, self._layer_context(layer_idx))
        keep = prob >= self.tau  # [B, T, H]
        if self.sinks is not None:
            keep |= self.sinks
        self.pending[layer_idx] = keep.permute(0, 2, 1).float()

    def _window_full(self, layer_idx: int) -> bool:
        if self.stacked is not None:
            return layer_idx in self.stacked[0]
        context = self.gate_context.get(layer_idx)
        return context is not None and context.keys.shape[2] == self.config.window - 1

    def _layer_context(self, layer_idx: int):
        """One layer's gate state (the stacked states of a decode split back into layers first)."""
        from ..gates.attention_gate import GateStack

        if self.stacked is not None:
            self.gate_context.update(zip(self.stacked[0], GateStack.unstack(self.stacked[1])))
            self.stacked = None
        return self.gate_context.get(layer_idx)

    def initial_stats(self, layer_idx, forward):
        if layer_idx in self.deferred:  # kept until `finish_forward` writes the flag
            shape = (forward.valid.shape[0], self.geometry.kv_heads, 1)
            return {STAT: torch.ones(shape, device=forward.valid.device)}
        flags = self.pending.pop(layer_idx, None)
        return None if flags is None else {STAT: flags}

    def finish_forward(self, forward, stores) -> None:
        """The deferred decode step: every gated layer's gate on its new token at once, the flags written to the
        rows the forward appended."""
        if self.forward is not forward or not self.deferred:
            return
        from ..gates.attention_gate import GateStack

        layers = tuple(self.deferred)
        if self.stacked is None or self.stacked[0] != layers:
            states = [self._layer_context(layer) for layer in layers]
            for layer in layers:
                del self.gate_context[layer]
            self.stacked = (layers, GateStack.stack(states))
        stacks = _STACKS.setdefault(self.gates, {})
        if layers not in stacks:
            stacks[layers] = GateStack([self.gates[str(layer)] for layer in layers])
        hidden = torch.stack([self.deferred[layer] for layer in layers])  # [G, B, 1, D]
        G, B, _, D = hidden.shape
        with torch.no_grad():
            prob, state = stacks[layers].step(hidden.view(G, B, D), self.stacked[1])
        self.stacked, self.deferred = (layers, state), {}
        keep = prob >= self.tau  # [G, B, H]
        if self.sinks is not None:
            keep |= self.sinks.view(1, B, 1)
        flags = keep.float()
        name = self.channel_prefix + STAT
        for g, layer in enumerate(layers):
            store = stores[layer]
            store.stat_channel(name).index_copy_(0, store.appended_rows, flags[g].view(-1))

    # ------------------------------------------------------------------ in-context visibility and eviction
    def key_visibility(self, layer_idx, ctx):
        if str(layer_idx) not in self.gates:
            return None
        return ctx.store.stat_channel(ctx.channel_prefix + STAT) > 0.5  # per storage row, no gather

    def score(self, layer_idx, ctx):
        return ctx.stat(STAT)

    def select(self, scores, positions, eviction):
        """Keep exactly the flagged-to-keep entries (sink tokens were flagged to keep when they arrived)."""
        return {layer: (positions[layer] >= 0) & ((score > 0.5) | (str(layer) not in self.gates))
                for layer, score in scores.items()}

    def describe(self) -> str:
        return f"{self.policy.name}(target={self.compression_ratio:g})"


@dataclass(frozen=True)
class AttentionGatePolicy(Policy):
    """In-context eviction by trained Attention-Gate flags."""

    compression_ratio: float | None = None  # None: the target the gates were trained for (set at construction)
    target: float | None = None  # shipped gates trained for this ratio; None: for compression_ratio if shipped, else 0.5
    gates: str | None = None  # checkpoint folder; None = the gates shipped for the model
    tau: float | None = None  # keep threshold on the gate's probability; None = the checkpoint's
    sink_tokens: int | None = None  # first tokens always kept; None = the checkpoint's
    decode_interval: int | None = 32

    name = "attention-gate"
    alters_forward = True
    State = AttentionGateState
    OPTIONAL_PARAMS: ClassVar[frozenset[str]] = Policy.OPTIONAL_PARAMS | {"compression_ratio", "target", "tau",
                                                                          "sink_tokens"}

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.compression_ratio is None:
            # the ratio the gates target: the named target, the checkpoint's, or that of the default shipped gates
            from ..gates.attention_gate import DEFAULT_TARGET, checkpoint_target

            ratio = self.target
            if ratio is None:
                ratio = DEFAULT_TARGET if self.gates is None else checkpoint_target(self.gates)
            object.__setattr__(self, "compression_ratio", ratio)

    def validate(self) -> None:
        self._check_number("compression_ratio", 0.0, 1.0)
        self._check_number("target", 0.0, 1.0)
        if self.gates is not None and self.target is not None:
            raise ValueError("target: picks among the shipped gates; with gates=DIR the checkpoint sets the target")
        if self.budget is not None:
            raise ValueError("budget: attention-gate keeps what its trained gates flag; it takes no token budget")
        if self.window:
            raise ValueError("window: attention-gate hides flagged keys in-context; it has no recent window")
        if self.allocation != "uniform" or self.head_floor is not None:
            raise ValueError("allocation/head_floor: attention-gate's per-head sizes come from its gates")
        self._check_number("tau", 0.0, 1.0, low_open=True)
        self._check_count("sink_tokens")
        self.validate_schedule()

    def describe(self) -> str:
        ratio = "trained target" if self.compression_ratio is None else f"target={self.compression_ratio:g}"
        return f"{self.name}({ratio})"
