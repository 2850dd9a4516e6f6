"""Checks a request's `extra_args["kvevict"]` when vLLM admits it, so that a bad setting is the client's error
(HTTP 400 in the OpenAI server, ValueError from `LLM.generate`) instead of an exception in the engine's scheduler,
which would stop the engine.

vLLM runs `validate_params` of every custom logits processor on each request's SamplingParams in the process that
receives it, before the request reaches the engine; `configure` adds this class to the server's logits processors.
The processor itself changes no logits.
"""

from __future__ import annotations

import torch
from vllm.v1.sample.logits_processor import LogitsProcessor

from .compat import layer_inputs_visible
from .settings import (
    LAYER_INPUT_POLICIES,
    Settings,
    check_runnable,
    geometry,
    request_settings,
)


class SettingsCheck(LogitsProcessor):
    """A logits processor that only validates: `server` is the server's settings and `vllm_config` the engine's,
    set by `configure` in the process that builds the config (the one that admits requests)."""

    server: Settings | None = None
    vllm_config = None

    @classmethod
    def validate_params(cls, sampling_params) -> None:
        if cls.server is None:
            return
        settings = request_settings(cls.server, sampling_params.extra_args)  # ValueError naming the parameter
        if settings.policy.name in LAYER_INPUT_POLICIES and cls.vllm_config is not None:
            # this engine must show the policy the hidden states, and its gates must load for the model
            model = cls.vllm_config.model_config
            check_runnable(settings.policy, geometry(model.hf_config, model.dtype),
                           layer_inputs_visible(cls.vllm_config))

    def __init__(self, vllm_config, device: torch.device, is_pin_memory: bool) -> None:
        pass

    def is_argmax_invariant(self) -> bool:
        return True  # never changes logits: greedy batches skip it

    def update_state(self, batch_update) -> None:
        pass

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        return logits
