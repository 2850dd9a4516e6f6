"""The worker side of eviction inside vLLM (CPU): show each prefill to the request's kvevict policy state as it
runs (selection.Prefill, fed by capture.py), let the state choose what each layer and KV head keeps, write the
kept K/V into the request's first slots with the kernel's own cache-write op, and shorten its block table. Later
tokens keep their true positions (RoPE) but are written, and read, after the kept ones (`seq_lens` and the slot
mapping shifted by the evicted count)."""

from __future__ import annotations

import time

import numpy as np
import torch
from vllm.logger import init_logger
from vllm.model_executor.models.utils import extract_layer_index
from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackendImpl
from vllm.v1.attention.backends.registry import AttentionBackendEnum, register_backend
from vllm.v1.worker.cpu_model_runner import CPUModelRunner
from vllm.v1.worker.cpu_worker import CPUWorker

from . import capture
from . import settings as plugin_settings
from .compat import layer_inputs_visible
from .selection import Prefill
from .settings import LAYER_INPUT_POLICIES, blocks_for, request_settings, start_state

logger = init_logger("vllm." + __name__)  # the logger tree vLLM configures


class EvictingCPUModelRunner(CPUModelRunner):
    """vLLM's CPU model runner, evicting each request once, in the step that ends its prefill.

    `kvevict_evicted[request id]`: tokens dropped (0 included) for requests already evicted.
    `kvevict_kept[request id]`: {layer: kept positions [kv_heads, k]} when the settings ask to record them.
    """

    def __init__(self, vllm_config, device):
        super().__init__(vllm_config, device)
        self.kvevict_settings = plugin_settings.parse(vllm_config.additional_config[plugin_settings.CONFIG_KEY])
        model_config = vllm_config.model_config
        self.kvevict_geometry = plugin_settings.geometry(model_config.hf_config, model_config.dtype)
        self.kvevict_evicted: dict[str, int] = {}
        self.kvevict_prefills: dict[str, Prefill] = {}  # requests whose prefill is under way
        self.kvevict_kept: dict[str, dict[int, torch.Tensor]] = {}
        self.kvevict_layer_inputs = layer_inputs_visible(vllm_config)
        self.kvevict_seconds = 0.0  # time spent scoring and compacting
        self.kvevict_evictions = 0

    def _update_states(self, scheduler_output):
        cached = scheduler_output.scheduled_cached_reqs
        gone = (set(scheduler_output.finished_req_ids) | set(scheduler_output.preempted_req_ids or ())
                | set(getattr(cached, "resumed_req_ids", ()) or ()))
        for request_id in gone:  # a resumed request is prefilled again, from its first token
            self.kvevict_evicted.pop(request_id, None)
            self.kvevict_prefills.pop(request_id, None)
        return super()._update_states(scheduler_output)

    def load_model(self, *args, **kwargs) -> None:
        super().load_model(*args, **kwargs)
        if self.kvevict_layer_inputs:
            names = [name for name, layer in self.compilation_config.static_forward_context.items()
                     if isinstance(getattr(layer, "impl", None), CPUAttentionBackendImpl)]
            capture.install_layer_input_hooks(self.get_model(), names)

    def _prepare_inputs(self, scheduler_output, num_scheduled_tokens):
        result = super()._prepare_inputs(scheduler_output, num_scheduled_tokens)
        num_reqs = self.input_batch.num_reqs
        starts = self.query_start_loc.np[: num_reqs + 1]
        evicted = np.zeros(num_reqs, dtype=np.int64)
        plan = []
        for index, request_id in enumerate(self.input_batch.req_ids[:num_reqs]):
            if request_id in self.kvevict_evicted:
                evicted[index] = self.kvevict_evicted[request_id]
                continue
            # not evicted yet: a prefill chunk, shown to the request's policy state as it passes
            prefill = self.kvevict_prefills.get(request_id)
            if prefill is None:
                prefill = self.kvevict_prefills[request_id] = self._kvevict_prefill(
                    request_id, int(self.input_batch.num_tokens_no_spec[index]))
            plan.append(capture.Span(prefill, int(starts[index]), int(starts[index + 1]),
                                     int(self.input_batch.num_computed_tokens_cpu[index])))
        capture.PLAN[:] = plan
        if evicted.any():
            # the kept tokens fill slots 0..k-1: attention reads seq_len - evicted slots, new tokens are written
            # at their position - evicted; the positions themselves (RoPE) stay the true ones
            total = int(starts[num_reqs])
            shift = torch.from_numpy(np.repeat(evicted, num_scheduled_tokens[:num_reqs]))
            self.seq_lens[:num_reqs] -= torch.from_numpy(evicted).to(self.seq_lens.dtype)
            self.input_batch.block_table.compute_slot_mapping(
                num_reqs, self.query_start_loc.gpu[: num_reqs + 1], self.positions[:total] - shift,
            )
        return result

    def execute_model(self, scheduler_output, intermediate_tensors=None):
        try:
            output = super().execute_model(scheduler_output, intermediate_tensors)
        finally:
            capture.PLAN.clear()
        plan = getattr(scheduler_output, "kvevict_plan", None) or {}
        if plan:
            began = time.perf_counter()
            for request_id, (seen, kept) in plan.items():
                self._kvevict_compact(request_id, seen, kept)
            self.kvevict_seconds += time.perf_counter() - began
        return output

    def _kvevict_extra_args(self, request_id: str) -> dict | None:
        params = self.requests[request_id].sampling_params
        return params.extra_args if params is not None else None

    def _kvevict_prefill(self, request_id: str, tokens: int) -> Prefill:
        """A fresh prefill of `tokens` tokens for the request, with its policy's state."""
        settings = request_settings(self.kvevict_settings, self._kvevict_extra_args(request_id))
        if settings.policy.name in LAYER_INPUT_POLICIES and not self.kvevict_layer_inputs:
            # admission refuses these (settings.check_runnable); never score from hidden states not seen
            raise RuntimeError(f"request {request_id}: {settings.policy.name} needs the hidden states entering "
                               "attention, which this compiled model does not show (--enforce-eager)")
        return Prefill(start_state(settings.policy, self.kvevict_geometry), tokens)

    def _kvevict_compact(self, request_id: str, seen: int, kept_count: int) -> None:
        """Evict request `request_id` after its prefill of `seen` tokens down to `kept_count` per layer and head."""
        prefill = self.kvevict_prefills.pop(request_id)
        settings = request_settings(self.kvevict_settings, self._kvevict_extra_args(request_id))
        if set(prefill.seen.values()) != {seen}:
            raise RuntimeError(f"request {request_id}: the layers saw {sorted(set(prefill.seen.values()))} "
                               f"tokens, expected {seen}")
        kept = prefill.select()
        counts = {int(indices.shape[1]) for indices in kept.values()}
        if counts != {kept_count}:
            raise RuntimeError(f"request {request_id}: the policy kept {sorted(counts)} tokens per head, the "
                               f"scheduler planned {kept_count}")
        if settings.record_kept:
            self.kvevict_kept[request_id] = kept

        request = self.requests[request_id]
        block_ids = request.block_ids[0]
        block_size = self.kv_cache_config.kv_cache_groups[0].kv_cache_spec.block_size
        slots = torch.tensor([block_ids[j // block_size] * block_size + j % block_size for j in range(kept_count)],
                             dtype=torch.int64)
        for name, attention in self._kvevict_attention_layers().items():
            layer = extract_layer_index(name)
            # the kernel's own write op lays the rows out as this CPU's attention kernel reads them
            keys, values = prefill.kept_kv(layer, kept[layer])
            CPUAttentionBackendImpl.do_kv_cache_update(attention.impl, attention, keys, values, attention.kv_cache,
                                                       slots)
        keep_blocks = blocks_for(kept_count, block_size)
        # one line per process shows that evictions run (and where), one per request at debug level
        message = "kvevict: request %s evicted after its prefill: kept %d of %d tokens, %d of %d blocks"
        args = (request_id, kept_count, seen, keep_blocks, len(block_ids))
        self.kvevict_evictions += 1
        if self.kvevict_evictions == 1:
            logger.info("first eviction of this worker; " + message, *args)
        else:
            logger.debug(message, *args)
        del block_ids[keep_blocks:]  # the scheduler gives these back to the pool after this step
        index = self.input_batch.req_id_to_index.get(request_id)
        if index is not None:
            self.input_batch.block_table[0].num_blocks_per_row[index] = keep_blocks
        self.kvevict_evicted[request_id] = seen - kept_count

    def _kvevict_attention_layers(self) -> dict:
        groups = self.kv_cache_config.kv_cache_groups
        if len(groups) != 1:
            raise RuntimeError("the kvevict plugin supports one KV cache group")
        context = self.compilation_config.static_forward_context
        return {name: context[name] for name in groups[0].layer_names}


class EvictingCPUWorker(CPUWorker):
    """vLLM's CPU worker with the evicting model runner and the capturing attention backend."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        register_backend(AttentionBackendEnum.CPU_ATTN, "kvevict.vllm.capture.CapturingCPUAttentionBackend")

    def init_device(self):
        if self.vllm_config.use_v2_model_runner:
            raise ValueError("the kvevict plugin runs on vLLM's V1 model runner; set VLLM_USE_V2_MODEL_RUNNER=0")
        super().init_device()
        # CPUWorker builds its runner class by name; replace it before the model is loaded
        self.model_runner = EvictingCPUModelRunner(self.vllm_config, torch.device("cpu"))
