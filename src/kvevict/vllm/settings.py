"""What the vLLM plugin is told: the server's `additional_config["kvevict"]` and a request's
`SamplingParams.extra_args["kvevict"]` (`vllm_xargs` in the OpenAI API), validated like `make_policy`.

A request is evicted once, when its prompt has been prefilled, as an EvictingCache evicts a prompt given in one
forward: the timing parameters (`prefill_chunk`, `decode_interval`) do not apply inside vLLM.

No vLLM import here: the scheduler and the worker both size evictions with these functions, so they agree.
"""

from __future__ import annotations

import copy
import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch

from ..contexts import EvictionContext, Geometry
from ..policies import make_policy
from ..policies.base import Policy, PolicyState

CONFIG_KEY = "kvevict"
# Policies whose states read only what a prefill passes through the model: the keys and values, the queries of
# every chunk (h2o accumulates their attention, snapkv/tova/ahakv keep the last ones) and, for fastkvzip, the
# hidden states entering each attention layer.
SUPPORTED_POLICIES = ("streamingllm", "window", "knorm", "snapkv", "tova", "h2o", "ahakv", "fastkvzip")
# Policies scored from the hidden states entering each attention layer: vLLM must run the model eagerly
# (a compiled model does not run the forward hooks that read them).
LAYER_INPUT_POLICIES = ("fastkvzip",)
# Parameters a request may not set: `gates` names a folder on the server.
SERVER_ONLY_PARAMS = ("gates",)


@dataclass(frozen=True)
class Settings:
    """One request's eviction settings: the policy (a kvevict Policy) and the options of the plugin itself.

    record_kept: keep each evicted request's kept positions on the model runner (`kvevict_kept`), for tests.
    """

    policy: Policy
    record_kept: bool = False


PLUGIN_OPTIONS = ("record_kept",)


def parse(config: dict | None, base: Settings | None = None) -> Settings:
    """Settings from a `{"policy": name, ...policy parameters, ...plugin options}` dict.

    With `base`, the dict overrides it: a request may change the policy or only some of its parameters.
    Raises ValueError naming the parameter, as `make_policy` does.
    """
    if config is not None and not isinstance(config, dict):
        raise ValueError(f"{CONFIG_KEY} settings must be a JSON object, got {type(config).__name__}")
    config = dict(config or {})
    options = {name: config.pop(name) for name in PLUGIN_OPTIONS if name in config}
    if base is not None:
        for name in SERVER_ONLY_PARAMS:
            if name in config:
                raise ValueError(f"{name} can be set in the server's {CONFIG_KEY} settings only, not per request")
    if base is None:
        name = config.pop("policy", None)
        if name is None:
            raise ValueError(f'{CONFIG_KEY} settings need a "policy" (one of {list(SUPPORTED_POLICIES)})')
        params = config
    else:
        name = config.pop("policy", base.policy.name)
        params = base.policy.params() if name == base.policy.name else {}
        params.update(config)
    if name not in SUPPORTED_POLICIES:
        raise ValueError(
            f"policy {name!r} is not supported inside vLLM yet; supported: {list(SUPPORTED_POLICIES)}"
        )
    policy = make_policy(name, **params)
    if policy.allocation != "uniform":
        raise ValueError(
            f"allocation must be 'uniform' inside vLLM (every layer and KV head of a request keeps the same "
            f"number of tokens), got {policy.allocation!r}"
        )
    if policy.budget is not None:
        raise ValueError("budget is not supported inside vLLM yet; size the cache with compression_ratio")
    record = options.get("record_kept", base.record_kept if base is not None else False)
    if not isinstance(record, bool):
        raise ValueError(f"record_kept must be true or false, got {record!r}")
    return Settings(policy=policy, record_kept=record)


def request_settings(base: Settings, extra_args: dict | None) -> Settings:
    """A request's settings: the server's, overridden by `extra_args["kvevict"]` (a dict, or its JSON text)
    when the request gives it."""
    if not extra_args or CONFIG_KEY not in extra_args:
        return base
    config = extra_args[CONFIG_KEY]
    if isinstance(config, str):  # the OpenAI API's vllm_xargs take strings, not objects: a JSON text
        try:
            config = json.loads(config)
        except json.JSONDecodeError as error:
            raise ValueError(f"{CONFIG_KEY} settings are not valid JSON: {error}") from None
    return parse(config, base)


def geometry(hf_config, dtype: torch.dtype) -> Geometry:
    """The kvevict Geometry of a model served by vLLM (from its transformers config). Every layer must be a
    full-attention layer: vLLM keeps sliding-window layers in their own block pool, which the plugin does not
    manage yet.

    A folder that `kvevict.models.model_path` wrote is named by its embedded model's name, as `load_model`
    names it, so that policies find the gates shipped for it."""
    config = hf_config.get_text_config() if hasattr(hf_config, "get_text_config") else hf_config
    kinds = getattr(config, "layer_types", None) or ["full_attention"] * config.num_hidden_layers
    for idx, kind in enumerate(kinds):
        if kind not in ("full_attention", "attention"):
            raise ValueError(
                f"layer {idx} has type {kind!r}; the kvevict vLLM plugin supports models whose layers are all "
                "full attention"
            )
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    return Geometry(
        layer_kinds=("full",) * len(kinds), kv_heads=kv_heads, group_size=heads // kv_heads,
        head_dim=getattr(config, "head_dim", None) or config.hidden_size // heads, dtype=dtype,
        device=torch.device("cpu"), model_config=_named(hf_config),
    )


def _named(hf_config):
    folder = Path(getattr(hf_config, "name_or_path", "") or "")
    if not (folder / "kvevict.json").is_file():
        return hf_config
    named = copy.copy(hf_config)  # vLLM's own config keeps the path it was given
    named.name_or_path = folder.name
    return named


def start_state(policy: Policy, geometry: Geometry) -> PolicyState:
    """`policy.start(geometry)`, with a missing gate checkpoint as a ValueError like a mismatched one (a client's
    error when a request asks for it)."""
    try:
        return policy.start(geometry)
    except FileNotFoundError as error:
        raise ValueError(str(error)) from None


def check_runnable(policy: Policy, geometry: Geometry, layer_inputs: bool) -> None:
    """Raise ValueError when this engine cannot evict with `policy`: a policy scored from the hidden states
    entering attention needs them (`layer_inputs`: vLLM runs the model eagerly) and gates that load for the
    model."""
    if policy.name not in LAYER_INPUT_POLICIES:
        return
    if not layer_inputs:
        raise ValueError(
            f"policy {policy.name!r} scores tokens from the hidden states entering each attention layer, which a "
            "compiled model does not hand out: start vLLM with --enforce-eager (enforce_eager=True)"
        )
    start_state(policy, geometry)


def prefill_eviction(tokens: int) -> EvictionContext:
    """The eviction at the end of one request's prefill of `tokens` tokens (batch of one, no padding)."""
    seen = torch.tensor([tokens])
    return EvictionContext(phase="prefill", seen=tokens, tokens_seen=seen, row_start=torch.zeros(1, dtype=torch.long))


def kept_tokens(policy: Policy, tokens: int, geometry: Geometry | None = None) -> int:
    """Tokens every layer and KV head keeps after a prefill of `tokens` tokens: the target
    ceil((1 - ratio) * tokens), raised to cover the protected tokens (sinks + recent window), at most `tokens`.
    The same number `PolicyState.select` keeps with uniform allocation.

    `geometry`: the served model's, needed by policies with trained gates (their state loads the gates, whose
    checkpoint gives fastkvzip's default ratio); the others size from their parameters alone."""
    state = start_state(policy, geometry or _NO_GEOMETRY)
    target = int(state.target_tokens(torch.tensor([tokens]))[0])
    eviction = prefill_eviction(tokens)
    protected = min(tokens, state.protected_prefix() + state.recent_window(target, eviction))
    return min(tokens, max(target, protected))


def blocks_for(tokens: int, block_size: int) -> int:
    """Blocks of `block_size` token slots that hold `tokens` tokens."""
    return math.ceil(tokens / block_size)


# policies without gates size from their parameters alone, never from the model's shape
_NO_GEOMETRY = Geometry(layer_kinds=(), kv_heads=1, group_size=1, head_dim=1, dtype=torch.float32,
                        device=torch.device("cpu"), model_config=None)
