"""vLLM's CPU attention backend, plus what a prefill shows the policy states of the requests the model runner is
about to evict: each layer's new keys and values, its queries (RoPE applied), and, through a forward pre-hook on
each decoder layer's attention module, the hidden states entering it (for states that read them).

The runner sets `PLAN` before a forward; with no plan the backend is CPU_ATTN unchanged and the hooks return at
once. Registered over CPU_ATTN (`register_backend`) by the plugin's worker only.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch
from vllm.model_executor.models.utils import extract_layer_index
from vllm.v1.attention.backends.cpu_attn import (
    CPUAttentionBackend,
    CPUAttentionBackendImpl,
)

from .selection import Prefill


@dataclass
class Span:
    """One request's tokens in this forward: rows [start, end) of the flattened batch hold positions
    [first_position, first_position + end - start), shown to the request's `prefill`."""

    prefill: Prefill
    start: int
    end: int
    first_position: int


PLAN: list[Span] = []  # set by the model runner for the forward under way


class CapturingCPUAttentionImpl(CPUAttentionBackendImpl):
    """CPU_ATTN's implementation; shows the planned requests' K/V and queries to their prefills as they pass
    (vLLM writes a layer's K/V before its attention runs)."""

    def do_kv_cache_update(self, layer, key, value, kv_cache, slot_mapping) -> None:
        super().do_kv_cache_update(layer, key, value, kv_cache, slot_mapping)
        if PLAN:
            index = extract_layer_index(layer.layer_name)
            for span in PLAN:
                span.prefill.append(index, key[span.start:span.end], value[span.start:span.end], span.first_position)

    def forward(self, layer, query, key, value, kv_cache, attn_metadata, output, output_scale=None,
                output_block_scale=None):
        if PLAN and attn_metadata is not None:
            index = extract_layer_index(layer.layer_name)
            for span in PLAN:
                # queries arrive flattened [tokens, heads * head_dim] or [tokens, heads, head_dim]
                rows = query[span.start:span.end].reshape(-1, self.num_heads, self.head_size)
                span.prefill.observe(index, rows, span.first_position, self.scale)
        return super().forward(layer, query, key, value, kv_cache, attn_metadata, output, output_scale,
                               output_block_scale)


class CapturingCPUAttentionBackend(CPUAttentionBackend):
    @staticmethod
    def get_impl_cls() -> type[CPUAttentionBackendImpl]:
        return CapturingCPUAttentionImpl


def install_layer_input_hooks(model: torch.nn.Module, attention_layer_names: list[str]) -> None:
    """A forward pre-hook on the module that owns each attention layer (a decoder layer's `self_attn`, named by
    the layer's own name minus its last part), handing the hidden states entering it to the planned prefills
    that read them. Needs an eager model: a compiled one does not run Python hooks per forward."""
    for name in attention_layer_names:
        owner_name = name.rpartition(".")[0]
        try:
            owner = model.get_submodule(owner_name)
        except AttributeError:
            raise ValueError(f"the kvevict plugin cannot find the attention module {owner_name!r} of layer "
                             f"{name!r} in {type(model).__name__}") from None
        parameters = inspect.signature(owner.forward).parameters
        if "hidden_states" not in parameters:
            raise ValueError(f"{type(owner).__name__}.forward takes no hidden_states; the kvevict plugin cannot "
                             "read the hidden states entering its attention")
        owner.register_forward_pre_hook(_layer_input_hook(extract_layer_index(name), owner.forward),
                                        with_kwargs=True)


def _layer_input_hook(layer: int, forward):
    signature = inspect.signature(forward)

    def hook(module, args, kwargs):
        if not any(span.prefill.wants_layer_input for span in PLAN):
            return
        hidden = signature.bind(*args, **kwargs).arguments["hidden_states"]
        for span in PLAN:
            if span.prefill.wants_layer_input:
                span.prefill.layer_input(layer, hidden[span.start:span.end], span.first_position)

    return hook
