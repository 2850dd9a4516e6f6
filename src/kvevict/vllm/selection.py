"""Which tokens each layer and KV head of one request keeps after its prefill, decided by a kvevict policy state
that sees the prefill as an EvictingCache's attention sees a prompt: chunk by chunk, each layer's new keys and
values (RoPE applied) are stored with the state's side channels, and the state observes the chunk's queries over
every key so far and, when it asks, reads the hidden states entering the layer.

The state runs the same hooks as inside an `EvictingCache` (`on_layer_input`, `initial_stats`, `observe`, then
`prepare_eviction`, `score`, `select`); only the contexts are built here. A chunk's queries over the keys so far
are a block of rows of the prompt's causal attention, so what a state sums over queries (H2O) adds up to what one
forward over the whole prompt gives, however vLLM splits the prompt. No vLLM import.
"""

from __future__ import annotations

import torch

from ..contexts import ForwardContext, LayerContext
from ..policies.base import PolicyState
from ..storage import LayerStore
from .settings import prefill_eviction

_ROW_START = torch.zeros(1, dtype=torch.long)  # one request per state: its first token is position 0


class Prefill:
    """One request's prefill as its policy state sees it, filled chunk by chunk by the attention backend.

    For each chunk and layer, in the order a forward runs: `layer_input` (only when `wants_layer_input`),
    `append` (the chunk's keys and values), `observe` (its queries). Then `select` gives the kept tokens and
    `kept_kv` their keys and values. `tokens`: the prompt's length, reserved in each layer's store at its first
    chunk (longer prompts still fit, at the cost of a copy).
    """

    def __init__(self, state: PolicyState, tokens: int):
        self.state, self.tokens = state, tokens
        self.stores: dict[int, LayerStore] = {}
        self.scaling: dict[int, float] = {}
        self.wants_layer_input = state.wants_layer_input()

    @property
    def seen(self) -> dict[int, int]:
        """Tokens stored so far, per layer."""
        return {layer: store.host_len[0] for layer, store in self.stores.items()}

    def forward(self, first_position: int, length: int) -> ForwardContext:
        """The chunk of `length` tokens from position `first_position`, as a forward the state is told of."""
        return ForwardContext(positions=torch.arange(first_position, first_position + length),
                              valid=torch.ones(1, length, dtype=torch.bool), input_ids=None, seen=first_position,
                              tokens_seen=torch.tensor([first_position]), row_start=_ROW_START)

    def layer_input(self, layer: int, hidden_states: torch.Tensor, first_position: int) -> None:
        """The hidden states [T, hidden_size] entering layer `layer`'s attention module for the chunk's tokens."""
        forward = self.forward(first_position, hidden_states.shape[0])
        self.state.on_layer_input(layer, hidden_states.unsqueeze(0), forward)

    def append(self, layer: int, keys: torch.Tensor, values: torch.Tensor, first_position: int) -> None:
        """Store the chunk's keys and values [T, kv_heads, head_dim] (copied) with the state's initial side
        channels for them."""
        length, heads, dim = keys.shape
        store = self.stores.get(layer)
        if store is None:
            store = self.stores[layer] = LayerStore(1, heads, dim, keys.dtype, keys.device)
        if store.host_len[0] != first_position:
            raise RuntimeError(f"layer {layer}: a chunk from position {first_position} after "
                               f"{store.host_len[0]} stored tokens")
        forward = self.forward(first_position, length)
        store.append(keys.transpose(0, 1).unsqueeze(0), values.transpose(0, 1).unsqueeze(0), forward.positions,
                     forward.valid, slack=max(0, self.tokens - first_position - length),
                     stats=self.state.initial_stats(layer, forward), all_valid=True)

    def observe(self, layer: int, queries: torch.Tensor, first_position: int, scaling: float) -> None:
        """The chunk's queries [T, heads, head_dim] (RoPE applied), after its keys were appended; `scaling`: the
        layer's softmax scale."""
        self.scaling[layer] = scaling
        if not self.state.observes:  # nothing will be evicted: an EvictingCache does not observe either
            return
        store = self.stores[layer]
        length, heads, dim = queries.shape
        ctx = self._context(layer, store, torch.tensor([first_position]), first_position)
        # [T, Hq, d] -> [1, H, G, T, d]: query head h * G + g reads KV head h, in vLLM as in transformers
        ctx.queries = queries.permute(1, 0, 2).reshape(1, store.heads, heads // store.heads, length, dim)
        ctx.query_positions = torch.arange(first_position, first_position + length)
        ctx.query_valid = torch.ones(1, length, dtype=torch.bool)
        self.state.observe(layer, ctx)

    def scores(self) -> dict[int, torch.Tensor]:
        """The state's scores at the eviction that ends the prefill: {layer: [1, kv_heads, tokens]}."""
        tokens = self._tokens()
        eviction = prefill_eviction(tokens)
        self.state.prepare_eviction(eviction)
        return {layer: self.state.score(layer, self._context(layer, store, eviction.tokens_seen, tokens))
                for layer, store in self.stores.items()}

    def select(self) -> dict[int, torch.Tensor]:
        """Kept token indices per layer: {layer: LongTensor [kv_heads, k]}, ascending within each head (index =
        position). Every layer keeps the same k per head (uniform allocation)."""
        tokens = self._tokens()
        if not self.state.evicts:
            return {layer: torch.arange(tokens).expand(store.heads, tokens) for layer, store in self.stores.items()}
        scores = self.scores()
        positions = {layer: store.view().positions for layer, store in self.stores.items()}
        keep = self.state.select(scores, positions, prefill_eviction(tokens))
        kept = {}
        for layer, mask in keep.items():
            counts = mask[0].sum(-1)
            if bool((counts != counts[0]).any()):
                raise RuntimeError(f"layer {layer}: KV heads keep different numbers of tokens {counts.tolist()}")
            kept[layer] = mask[0].nonzero()[:, 1].view(mask.shape[1], -1)
        return kept

    def kept_kv(self, layer: int, kept: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The keys and values [k, kv_heads, head_dim] of `kept` ([kv_heads, k] token indices) in layer `layer`."""
        view = self.stores[layer].view()
        return gather_kept(view.keys[0].transpose(0, 1), kept), gather_kept(view.values[0].transpose(0, 1), kept)

    def _tokens(self) -> int:
        counts = set(self.seen.values())
        if len(counts) != 1:
            raise RuntimeError(f"layers stored different numbers of tokens: {self.seen}")
        return counts.pop()

    def _context(self, layer: int, store: LayerStore, tokens_seen: torch.Tensor, seen: int) -> LayerContext:
        return LayerContext(layer, store.view(), store, self.scaling[layer], row_start=_ROW_START,
                            tokens_seen=tokens_seen, seen=seen)


def gather_kept(tensor: torch.Tensor, kept: torch.Tensor) -> torch.Tensor:
    """Per-head gather: out[j, h] = tensor[kept[h, j], h] for a [tokens, kv_heads, head_dim] tensor and kept
    indices [kv_heads, k]; the result [k, kv_heads, head_dim] is what vLLM writes for k token slots."""
    heads = torch.arange(tensor.shape[1])
    return tensor[kept.t(), heads.view(1, -1)]
