"""Eviction policies, one file per method. `make_policy(name, **params)` builds one by name."""

from __future__ import annotations

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
    for cls in (
        FullPolicy,
        WindowPolicy,
        StreamingLLMPolicy,
        H2OPolicy,
        SnapKVPolicy,
        TOVAPolicy,
        KnormPolicy,
        RandomPolicy,
    )
}


def list_policies() -> list[str]:
    """Names accepted by `make_policy`."""
    return sorted(POLICIES)


def make_policy(name: str, **params) -> Policy:
    """Build the policy `name` with its parameters, e.g. make_policy("snapkv", compression_ratio=0.75)."""
    key = name.lower().replace("_", "-")
    cls = POLICIES.get(key) or POLICIES.get(key.replace("-", ""))
    if cls is None:
        raise ValueError(f"unknown policy {name!r}; choose one of {', '.join(list_policies())}")
    accepted = {f.name for f in fields(cls) if f.init}
    unknown = sorted(set(params) - accepted)
    if unknown:
        raise ValueError(f"policy {cls.name!r} has no parameter(s) {unknown}; it accepts {sorted(accepted)}")
    return cls(**params)


__all__ = ["Policy", "POLICIES", "list_policies", "make_policy"]
