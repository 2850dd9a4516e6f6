"""What differs between the transformers releases kvevict supports, known in this module only.

transformers 5.24 renamed the cache argument of `generate()` and of every model's `forward()` from
`past_key_values` to `cache`; the old name stays a deprecated alias (until 6.0), so a caller may use either,
by keyword or by position. Everything else in kvevict asks this module instead of branching on versions.
"""

from __future__ import annotations

import inspect
from contextlib import contextmanager
from typing import Any, Callable

CACHE_NAMES = ("cache", "past_key_values")  # newest first


def _installed_cache_name() -> str:
    from transformers.models.llama.modeling_llama import LlamaModel

    parameters = inspect.signature(LlamaModel.forward).parameters
    for name in CACHE_NAMES:
        if name in parameters:
            return name
    raise ImportError("the installed transformers' model forward takes neither `cache` nor `past_key_values`; "
                      "kvevict supports the releases listed in its pyproject.toml")


CACHE_ARG = _installed_cache_name()  # the name the installed transformers' forward() and generate() take


def cache_kwargs(cache) -> dict[str, Any]:
    """Keyword arguments that hand `cache` to a model's forward() or generate(): `{CACHE_ARG: cache}`."""
    return {CACHE_ARG: cache}


def call_reader(forward: Callable) -> Callable[[tuple, dict], dict[str, Any]]:
    """A function that names the arguments of one call to `forward` (a bound method, e.g. a decoder's forward
    seen from a forward hook): positional arguments get their parameter names, and the cache, passed under
    either name, by keyword or by position, comes back under "cache"."""
    names = []
    for parameter in inspect.signature(forward).parameters.values():
        if parameter.kind not in (parameter.POSITIONAL_ONLY, parameter.POSITIONAL_OR_KEYWORD):
            break
        names.append(parameter.name)

    def read(args: tuple, kwargs: dict) -> dict[str, Any]:
        named = {**dict(zip(names, args)), **kwargs}
        named["cache"] = next((named[name] for name in CACHE_NAMES if named.get(name) is not None), None)
        return named

    return read


def _set_attention(model, impl: str) -> None:
    if hasattr(model, "set_attn_implementation"):
        model.set_attn_implementation(impl)
    else:  # releases without the setter read the config field
        model.config._attn_implementation = impl


@contextmanager
def attention_implementation(model, impl: str):
    """Inside the block the model's attention runs `impl` ("eager", "sdpa" or a registered name); the previous
    implementation is restored after."""
    previous = model.config._attn_implementation
    _set_attention(model, impl)
    try:
        yield
    finally:
        _set_attention(model, previous)
