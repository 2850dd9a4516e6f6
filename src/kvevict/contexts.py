"""What a policy state is told, and nothing more: the cache's shape when it starts, then one context per forward,
per attention layer and per eviction. Policies never hold the cache itself."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Callable

import torch

if TYPE_CHECKING:
    from .policies.base import PolicyState
    from .storage import LayerStore, PaddedView


@dataclass(frozen=True)
class Geometry:
    """The shape of the cache a policy state serves, fixed when the cache is made."""

    layer_kinds: tuple[str, ...]  # per decoder layer: "full" or "sliding"
    kv_heads: int
    group_size: int  # query heads per KV head
    head_dim: int
    dtype: torch.dtype
    device: torch.device
    model_config: object  # the model's transformers config: its identity, for trained gates

    @property
    def evictable_layers(self) -> tuple[int, ...]:
        """Layers a policy scores (sliding-window layers keep their own window)."""
        return tuple(i for i, kind in enumerate(self.layer_kinds) if kind == "full")

    @classmethod
    def of(cls, model: torch.nn.Module) -> Geometry:
        config = model.config.get_text_config(decoder=True)
        kinds = getattr(config, "layer_types", None) or ["full_attention"] * config.num_hidden_layers
        layer_kinds = []
        for idx, kind in enumerate(kinds):
            if kind not in ("full_attention", "attention", "sliding_attention"):
                raise ValueError(f"layer {idx} has type {kind!r}; EvictingCache supports full and sliding attention layers")
            layer_kinds.append("sliding" if kind == "sliding_attention" else "full")
        heads = config.num_attention_heads
        kv_heads = getattr(config, "num_key_value_heads", None) or heads
        parameter = next(model.parameters())
        return cls(
            layer_kinds=tuple(layer_kinds), kv_heads=kv_heads, group_size=heads // kv_heads,
            head_dim=getattr(config, "head_dim", None) or config.hidden_size // heads,
            dtype=parameter.dtype, device=parameter.device, model_config=model.config,
        )


@dataclass
class ForwardContext:
    """One forward pass through the cache (before any of it is stored)."""

    positions: torch.Tensor  # [T] positions of the new tokens
    valid: torch.Tensor  # [B, T] False for padding
    input_ids: torch.Tensor | None  # [B, T], None when the model got inputs_embeds
    seen: int  # positions seen before this forward (padding included)
    tokens_seen: torch.Tensor  # [B] real tokens seen before this forward
    row_start: torch.Tensor  # [B] position of each row's first real token (-1: none yet)
    all_valid: bool = False  # known on the host: no token of this forward is padding
    # the caller calls the state's `finish_forward` once every layer stored this forward's tokens (EvictingCache
    # does), so a state may defer the side channels of its tokens to it
    finishes: bool = False


@dataclass
class EvictionContext:
    """One eviction: when it happens and what the cache has seen."""

    phase: str  # "prefill" (after a prompt chunk) or "decode" (every decode_interval decoded tokens)
    seen: int  # positions seen (the last one is seen - 1)
    tokens_seen: torch.Tensor  # [B] real tokens seen
    row_start: torch.Tensor  # [B]
    # run token ids [1, n] through the model after everything seen, observed by the given state only, and forget
    # them afterwards (KVzip's repeat passes); None where the cache has no model to run
    replay: Callable[[torch.Tensor, PolicyState], None] | None = None

    @property
    def batch(self) -> int:
        return self.tokens_seen.shape[0]


@dataclass
class LayerContext:
    """What a policy sees of one layer: the kept entries and, inside attention, the queries reading them."""

    layer_idx: int
    view: PaddedView
    store: LayerStore
    scaling: float
    row_start: torch.Tensor  # [B] position of each row's first real token
    tokens_seen: torch.Tensor  # [B] real tokens seen before the forward under way (at an eviction: all of them)
    seen: int  # positions seen before the forward under way (at an eviction: all of them)
    sliding_window: int | None = None
    queries: torch.Tensor | None = None  # [B, H, G, T, d], RoPE applied
    query_positions: torch.Tensor | None = None  # [T]
    query_valid: torch.Tensor | None = None  # [B, T], False for padding
    # [B, Hq, T] log-sum-exp of each query row's attention logits (scaled), when the layer's attention produced it
    # (a fresh prefill through the fused CPU kernel): column sums of the attention then need one pass, not two
    attention_lse: torch.Tensor | None = None
    # [B, H, G, T] log-sum-exp of each query row over the forward's own tokens only (causal), when the layer's
    # attention read older rows and the new tokens in separate passes (KVzip's repeat passes)
    new_tokens_lse: torch.Tensor | None = None
    channel_prefix: str = ""  # the reading state's namespace among the store's side channels

    def relative_positions(self) -> torch.Tensor:
        """Kept positions counted from each row's first real token: [B, H, L] (-1 on empty slots)."""
        pos = self.view.positions.long()
        return torch.where(pos >= 0, pos - self.row_start.view(-1, 1, 1).clamp(min=0), -1)

    def stat(self, name: str) -> torch.Tensor:
        """Side channel `name` laid out like the view: [B, H, L] (0 on empty slots)."""
        return self.store.gather_stat(self.channel_prefix + name, self.view)

    def add_stat(self, name: str, amount: torch.Tensor) -> None:
        self.store.add_stat(self.channel_prefix + name, self.view, amount)

    def set_stat(self, name: str, value: torch.Tensor) -> None:
        self.store.set_stat(self.channel_prefix + name, self.view, value)

    def within(self, prefix: str) -> LayerContext:
        """The same layer seen by a state whose side channels live under `prefix` (ObserverSet members)."""
        return replace(self, channel_prefix=self.channel_prefix + prefix)
