"""Which tokens each layer and KV head of one request keeps after its prefill, decided by a kvevict policy state
from what vLLM's attention backend saw: the prompt's keys (RoPE applied) and the queries of the last window.

The state scores and selects exactly as it does inside an `EvictingCache` (same `observe`, `score`, `select`):
only the view it reads is built here, from the captured tensors. No vLLM import.
"""

from __future__ import annotations

import torch

from ..contexts import LayerContext
from ..policies.base import PolicyState
from ..storage import PaddedView
from .settings import prefill_eviction


def prompt_view(keys: torch.Tensor, values: torch.Tensor) -> PaddedView:
    """A one-row view of a prompt's K/V ([tokens, kv_heads, head_dim] each, token order = position order)."""
    tokens, heads, _ = keys.shape
    positions = torch.arange(tokens, dtype=torch.int32).expand(1, heads, tokens)
    valid = torch.ones(1, heads, tokens, dtype=torch.bool)
    row_index = torch.arange(heads * tokens).view(1, heads, tokens)
    return PaddedView(keys.transpose(0, 1).unsqueeze(0), values.transpose(0, 1).unsqueeze(0), positions, valid,
                      row_index, no_empty_slots=True, heads_aligned=True)


def select_kept(state: PolicyState, layers: dict[int, dict]) -> dict[int, torch.Tensor]:
    """Kept token indices per layer: {layer: LongTensor [kv_heads, k]}, ascending within each head.

    `layers[layer]` holds "keys", "values" ([tokens, kv_heads, head_dim]), "scaling" (float) and, when the
    policy reads recent queries, "queries" [window, heads, head_dim] with "query_positions" [window].
    Every layer keeps the same k per head (uniform allocation).
    """
    tokens = next(iter(layers.values()))["keys"].shape[0]
    eviction = prefill_eviction(tokens)
    row_start = torch.zeros(1, dtype=torch.long)
    scores, positions = {}, {}
    for layer, seen in layers.items():
        view = prompt_view(seen["keys"], seen["values"])
        ctx = LayerContext(layer, view, None, seen["scaling"], row_start=row_start,
                           tokens_seen=eviction.tokens_seen, seen=tokens)
        if state.policy.query_window:
            queries = seen["queries"]  # [w, Hq, d] -> [1, H, G, w, d], the grouping vLLM's kernels use
            window, _, dim = queries.shape
            ctx.queries = queries.permute(1, 0, 2).reshape(1, state.geometry.kv_heads, -1, window, dim)
            ctx.query_positions = seen["query_positions"].long()
            ctx.query_valid = torch.ones(1, window, dtype=torch.bool)
            state.observe(layer, ctx)
        scores[layer] = state.score(layer, ctx)
        positions[layer] = view.positions
    state.prepare_eviction(eviction)
    keep = state.select(scores, positions, eviction)
    kept = {}
    for layer, mask in keep.items():
        counts = mask[0].sum(-1)
        if bool((counts != counts[0]).any()):
            raise RuntimeError(f"layer {layer}: KV heads keep different numbers of tokens {counts.tolist()}")
        kept[layer] = mask[0].nonzero()[:, 1].view(mask.shape[1], -1)
    return kept


def gather_kept(tensor: torch.Tensor, kept: torch.Tensor) -> torch.Tensor:
    """Per-head gather: out[j, h] = tensor[kept[h, j], h] for a [tokens, kv_heads, head_dim] tensor and kept
    indices [kv_heads, k]; the result [k, kv_heads, head_dim] is what vLLM writes for k token slots."""
    heads = torch.arange(tensor.shape[1])
    return tensor[kept.t(), heads.view(1, -1)]
