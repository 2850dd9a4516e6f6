"""The scheduler side of eviction inside vLLM: decide when a request's prefill ends and how many tokens it keeps,
count its blocks by the tokens it holds (seen minus evicted), and give the tail blocks back to the pool."""

from __future__ import annotations

from vllm.logger import init_logger
from vllm.v1.core.sched.scheduler import Scheduler
from vllm.v1.core.single_type_kv_cache_manager import FullAttentionManager
from vllm.v1.request import Request, RequestStatus

from . import settings as plugin_settings
from .settings import blocks_for, kept_tokens, request_settings

logger = init_logger("vllm." + __name__)  # the logger tree vLLM configures


class EvictingFullAttentionManager(FullAttentionManager):
    """vLLM's full-attention block manager for requests that hold fewer tokens than they have seen.

    `evicted[request_id]` tokens of a request were dropped at its eviction: its blocks are counted for
    tokens - evicted, so new tokens go right after the kept ones. A request in `evicted` (0 included) has been
    evicted once and is not evicted again; the entry goes with the request's blocks (finish or preemption).
    """

    evicted: dict[str, int]

    def get_num_blocks_to_allocate(self, request_id, num_tokens, new_computed_blocks, total_computed_tokens,
                                   num_local_computed_tokens, num_tokens_main_model, apply_admission_cap=False,
                                   prefill_end=0):
        dropped = self.evicted.get(request_id, 0)
        return super().get_num_blocks_to_allocate(
            request_id, num_tokens - dropped, new_computed_blocks, total_computed_tokens,
            num_local_computed_tokens, num_tokens_main_model - dropped, apply_admission_cap=apply_admission_cap,
            prefill_end=prefill_end,
        )

    def allocate_new_blocks(self, request_id, num_tokens, num_tokens_main_model):
        dropped = self.evicted.get(request_id, 0)
        return super().allocate_new_blocks(request_id, num_tokens - dropped, num_tokens_main_model - dropped)

    def pop_blocks_for_free(self, request_id):
        self.evicted.pop(request_id, None)
        return super().pop_blocks_for_free(request_id)

    def shrink(self, request_id: str, seen: int, kept: int) -> int:
        """After an eviction that kept `kept` of `seen` tokens: free the blocks past ceil(kept / block_size).
        Returns the number of blocks freed."""
        blocks = self.req_to_blocks[request_id]
        keep = blocks_for(kept, self.block_size)
        tail = blocks[keep:]
        del blocks[keep:]
        self.block_pool.free_blocks(reversed(tail))  # tail first, as vLLM frees
        self.evicted[request_id] = seen - kept
        return len(tail)


class EvictingScheduler(Scheduler):
    """vLLM's scheduler, with each request evicted once, at the end of its prefill.

    The step that finishes a request's prefill carries `kvevict_plan` {request id: (tokens seen, tokens kept)}
    to the model runner, which compacts the kept K/V into the request's first blocks during that step; when the
    step's output comes back, the tail blocks return to the pool, so more requests run.
    """

    def __init__(self, vllm_config, *args, **kwargs):
        super().__init__(vllm_config, *args, **kwargs)
        if self.cache_config.enable_prefix_caching:
            raise ValueError("the kvevict plugin needs prefix caching off (--no-enable-prefix-caching): the blocks "
                             "of an evicted request hold other tokens than their hashes say")
        self.kvevict_settings = plugin_settings.parse(vllm_config.additional_config[plugin_settings.CONFIG_KEY])
        model_config = vllm_config.model_config
        self.kvevict_geometry = plugin_settings.geometry(model_config.hf_config, model_config.dtype)
        self.kvevict_requests: dict[str, plugin_settings.Settings] = {}
        managers = self.kv_cache_manager.coordinator.single_type_managers
        if len(managers) != 1 or type(managers[0]) is not FullAttentionManager:
            raise ValueError("the kvevict plugin supports models with one full-attention KV cache group; this model "
                             f"has {[type(m).__name__ for m in managers]}")
        manager = managers[0]
        manager.__class__ = EvictingFullAttentionManager  # same state, eviction-aware block counting
        manager.evicted = {}
        self.kvevict_manager: EvictingFullAttentionManager = manager
        self.kvevict_blocks_freed = 0  # blocks given back by evictions so far
        # per evicted request, when its settings ask to record: blocks held and the pool's free blocks, before
        # and after its tail blocks went back
        self.kvevict_block_records: dict[str, dict[str, int]] = {}

    def add_request(self, request: Request) -> None:
        extra = request.sampling_params.extra_args if request.sampling_params is not None else None
        self.kvevict_requests[request.request_id] = request_settings(self.kvevict_settings, extra)
        super().add_request(request)

    def schedule(self, *args, **kwargs):
        output = super().schedule(*args, **kwargs)
        plan = {}
        for request_id in output.num_scheduled_tokens:
            request = self.requests[request_id]
            if request_id in self.kvevict_manager.evicted or request.is_prefill_chunk:
                continue
            seen = request.num_computed_tokens  # this step ends the prefill
            policy = self.kvevict_requests[request_id].policy
            plan[request_id] = (seen, kept_tokens(policy, seen, self.kvevict_geometry))
        output.kvevict_plan = plan
        return output

    def update_from_output(self, scheduler_output, model_runner_output):
        outputs = super().update_from_output(scheduler_output, model_runner_output)
        for request_id, (seen, kept) in getattr(scheduler_output, "kvevict_plan", {}).items():
            request = self.requests.get(request_id)
            if request is None or request.status != RequestStatus.RUNNING:
                continue  # finished (its blocks are free already) or preempted
            manager, pool = self.kvevict_manager, self.kv_cache_manager.block_pool
            before = (len(manager.req_to_blocks[request_id]), pool.get_num_free_blocks())
            freed = manager.shrink(request_id, seen, kept)
            self.kvevict_blocks_freed += freed
            if self.kvevict_requests[request_id].record_kept:
                self.kvevict_block_records[request_id] = {
                    "seen": seen, "kept": kept, "blocks_before": before[0],
                    "blocks_after": len(manager.req_to_blocks[request_id]), "free_before": before[1],
                    "free_after": pool.get_num_free_blocks(), "block_size": manager.block_size}
        return outputs

    def _free_request(self, request: Request, *args, **kwargs):
        self.kvevict_requests.pop(request.request_id, None)
        return super()._free_request(request, *args, **kwargs)
