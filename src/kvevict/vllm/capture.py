"""vLLM's CPU attention backend, plus a copy of what a prefill writes: the keys and values of the requests the
model runner is about to evict, and the queries of their last window (RoPE applied), per layer.

The runner sets `PLAN` before a forward and reads `CAPTURED` after it; with no plan the backend is CPU_ATTN
unchanged. Registered over CPU_ATTN (`register_backend`) by the plugin's worker only.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from vllm.model_executor.models.utils import extract_layer_index
from vllm.v1.attention.backends.cpu_attn import (
    CPUAttentionBackend,
    CPUAttentionBackendImpl,
)


@dataclass
class Span:
    """One request's tokens in this forward: rows [start, end) of the flattened batch hold positions
    [first_position, first_position + end - start); queries at positions >= query_from are kept."""

    request_id: str
    start: int
    end: int
    first_position: int
    query_from: int


@dataclass
class Captured:
    """What one request's prefill wrote, per layer: K/V chunks in position order, recent queries, scaling."""

    keys: dict[int, list[torch.Tensor]] = field(default_factory=dict)
    values: dict[int, list[torch.Tensor]] = field(default_factory=dict)
    queries: dict[int, list[torch.Tensor]] = field(default_factory=dict)
    query_positions: dict[int, list[torch.Tensor]] = field(default_factory=dict)
    scaling: dict[int, float] = field(default_factory=dict)


PLAN: list[Span] = []  # set by the model runner for the forward under way
CAPTURED: dict[str, Captured] = {}  # request id -> what its prefill chunks wrote so far


class CapturingCPUAttentionImpl(CPUAttentionBackendImpl):
    """CPU_ATTN's implementation; copies the planned requests' K/V and recent queries as they pass."""

    def do_kv_cache_update(self, layer, key, value, kv_cache, slot_mapping) -> None:
        super().do_kv_cache_update(layer, key, value, kv_cache, slot_mapping)
        if PLAN:
            index = extract_layer_index(layer.layer_name)
            for span in PLAN:
                seen = CAPTURED.setdefault(span.request_id, Captured())
                seen.keys.setdefault(index, []).append(key[span.start:span.end].clone())
                seen.values.setdefault(index, []).append(value[span.start:span.end].clone())

    def forward(self, layer, query, key, value, kv_cache, attn_metadata, output, output_scale=None,
                output_block_scale=None):
        if PLAN and attn_metadata is not None:
            index = extract_layer_index(layer.layer_name)
            for span in PLAN:
                seen = CAPTURED.setdefault(span.request_id, Captured())
                seen.scaling[index] = self.scale
                skip = max(0, span.query_from - span.first_position)
                if span.start + skip < span.end:
                    # queries arrive flattened [tokens, heads * head_dim] or [tokens, heads, head_dim]
                    rows = query[span.start + skip:span.end].reshape(-1, self.num_heads, self.head_size)
                    seen.queries.setdefault(index, []).append(rows.clone())
                    first = span.first_position + skip
                    seen.query_positions.setdefault(index, []).append(torch.arange(first, first + rows.shape[0]))
        return super().forward(layer, query, key, value, kv_cache, attn_metadata, output, output_scale,
                               output_block_scale)


class CapturingCPUAttentionBackend(CPUAttentionBackend):
    @staticmethod
    def get_impl_cls() -> type[CPUAttentionBackendImpl]:
        return CapturingCPUAttentionImpl
