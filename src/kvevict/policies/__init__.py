"""Eviction policies, one file per method. `make_policy(name, **params)` builds one by name."""

from __future__ import annotations

import importlib
import importlib.util
from dataclasses import fields

from .base import Policy
from .full import FullPolicy
from .h2o import H2OPolicy
from .knorm import KnormPolicy
from .random import RandomPolicy
from .snapkv import SnapKVPolicy
from .streamingllm import StreamingLLMPolicy
from .tova import TOVAPolicy
from .window import WindowPolicy

POLICIES: dict[str, type[Policy]] = {
    cls.name: cls
    for cls in (FullPolicy, WindowPolicy, StreamingLLMPolicy, H2OPolicy, SnapKVPolicy, TOVAPolicy, KnormPolicy,
                RandomPolicy)
}
# Methods whose modules are imported only when asked for (some carry trained gates or heavier code).
LAZY_POLICIES: dict[str, tuple[str, str]] = {
    "fastgen": ("kvevict.policies.fastgen", "FastGenPolicy"),
    "ahakv": ("kvevict.policies.ahakv", "AhaKVPolicy"),
    "kvzip": ("kvevict.policies.kvzip", "KVzipPolicy"),
    "fastkvzip": ("kvevict.policies.fastkvzip", "FastKVzipPolicy"),
    "attention-gate": ("kvevict.policies.attention_gate", "AttentionGatePolicy"),
}


def _available_lazy() -> list[str]:
    return [name for name, (module, _) in LAZY_POLICIES.items() if importlib.util.find_spec(module) is not None]


def list_policies() -> list[str]:
    """Names accepted by `make_policy`."""
    return sorted([*POLICIES, *_available_lazy()])


def policy_class(name: str) -> type[Policy]:
    """The policy class registered as `name` (case and -/_ insensitive)."""
    if not isinstance(name, str):
        raise ValueError(f"policy name must be a string, one of {', '.join(list_policies())}; got {name!r}")
    key = name.lower().replace("_", "-")
    for candidate in (key, key.replace("-", "")):
        if candidate in POLICIES:
            return POLICIES[candidate]
        if candidate in LAZY_POLICIES and candidate in _available_lazy():
            module, attr = LAZY_POLICIES[candidate]
            return getattr(importlib.import_module(module), attr)
    raise ValueError(f"unknown policy {name!r}; choose one of {', '.join(list_policies())}")


def make_policy(name: str, **params) -> Policy:
    """Build the policy `name` with its parameters, e.g. make_policy("snapkv", compression_ratio=0.75)."""
    cls = policy_class(name)
    accepted = {f.name for f in fields(cls) if f.init}
    unknown = sorted(set(params) - accepted)
    if unknown:
        raise ValueError(f"policy {cls.name!r} has no parameter(s) {unknown}; it accepts {sorted(accepted)}")
    return cls(**params)


__all__ = ["LAZY_POLICIES", "POLICIES", "Policy", "list_policies", "make_policy", "policy_class"]
