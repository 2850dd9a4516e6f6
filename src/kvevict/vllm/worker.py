"""The worker side of eviction inside vLLM (CPU): capture a prefill's K/V and recent queries, let the request's
kvevict policy choose what each layer and KV head keeps, write the kept K/V into the request's first slots with
the kernel's own cache-write op, and shorten its block table. Later tokens keep their true positions (RoPE) but
are written, and read, after the kept ones (`seq_lens` and the slot mapping shifted by the evicted count)."""

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
from .selection import gather_kept, select_kept
from .settings import blocks_for, request_settings

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
        self.kvevict_kept: dict[str, dict[int, torch.Tensor]] = {}
        self.kvevict_seconds = 0.0  # time spent scoring and compacting
        self.kvevict_evictions = 0

    def _update_states(self, scheduler_output):
        cached = scheduler_output.scheduled_cached_reqs
        gone = (set(scheduler_output.finished_req_ids) | set(scheduler_output.preempted_req_ids or ())
                | set(getattr(cached, "resumed_req_ids", ()) or ()))
        for request_id in gone:  # a resumed request is prefilled again, from its first token
            self.kvevict_evicted.pop(request_id, None)
            capture.CAPTURED.pop(request_id, None)
        return super()._update_states(scheduler_output)

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
            # not evicted yet: a prefill chunk, copied as it is written
            window = request_settings(self.kvevict_settings, self._kvevict_extra_args(request_id)).policy.query_window
            known = int(self.input_batch.num_tokens_no_spec[index])
            plan.append(capture.Span(request_id, int(starts[index]), int(starts[index + 1]),
                                     int(self.input_batch.num_computed_tokens_cpu[index]), max(0, known - window)))
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

    def _kvevict_compact(self, request_id: str, seen: int, kept_count: int) -> None:
        """Evict request `request_id` after its prefill of `seen` tokens down to `kept_count` per layer and head."""
        captured = capture.CAPTURED.pop(request_id)
        settings = request_settings(self.kvevict_settings, self._kvevict_extra_args(request_id))
        state = settings.policy.start(self.kvevict_geometry)
        window = settings.policy.query_window
        layers = {}
        for layer, chunks in captured.keys.items():
            keys = torch.cat(chunks)
            if keys.shape[0] != seen:
                raise RuntimeError(f"request {request_id}: captured {keys.shape[0]} tokens of layer {layer}, "
                                   f"expected {seen}")
            layers[layer] = {"keys": keys, "values": torch.cat(captured.values[layer]),
                             "scaling": captured.scaling[layer]}
            if window:
                layers[layer]["queries"] = torch.cat(captured.queries[layer])[-window:]
                layers[layer]["query_positions"] = torch.cat(captured.query_positions[layer])[-window:]
        kept = select_kept(state, layers)
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
            CPUAttentionBackendImpl.do_kv_cache_update(
                attention.impl, attention, gather_kept(layers[layer]["keys"], kept[layer]),
                gather_kept(layers[layer]["values"], kept[layer]), attention.kv_cache, slots,
            )
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
