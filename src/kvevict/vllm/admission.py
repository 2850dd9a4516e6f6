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

from .settings import Settings, request_settings


class SettingsCheck(LogitsProcessor):
    """A logits processor that only validates: `server` is the server's settings, set by `configure` in the
    process that builds the config (the one that admits requests)."""

    server: Settings | None = None

    @classmethod
    def validate_params(cls, sampling_params) -> None:
        if cls.server is not None:
            request_settings(cls.server, sampling_params.extra_args)  # raises ValueError naming the parameter

    def __init__(self, vllm_config, device: torch.device, is_pin_memory: bool) -> None:
        pass

    def is_argmax_invariant(self) -> bool:
        return True  # never changes logits: greedy batches skip it

    def update_state(self, batch_update) -> None:
        pass

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        return logits
