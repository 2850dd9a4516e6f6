"""How an EvictingCache plugs into a model: forward hooks on its decoder and attention modules.

The hooks are installed once per model and do nothing unless the forward receives a cache that asks for them
(a `HookedCache`). For such a forward the pre-hook brackets it: the cache learns the new tokens and padding,
becomes the *active* cache the attention function reads, and the model's attention implementation is switched to
kvevict's for this forward only (restored afterwards, so the model stays as its owner set it).
"""

from __future__ import annotations

import threading

import torch

from .attention import ATTN_IMPLEMENTATION, activate, active_cache, deactivate, register
from .compat import call_reader


class HookedCache:
    """What the hooks drive: a cache that brackets each forward and hands layer inputs to its policy."""

    def begin_forward(self, batch: int, length: int, attention_mask, device, input_ids=None) -> None:
        raise NotImplementedError

    def end_forward(self, failed: bool = False) -> None:
        raise NotImplementedError

    def layer_input(self, layer_idx: int, hidden_states: torch.Tensor) -> None:
        """The hidden states entering layer `layer_idx`'s attention module, during this cache's forward."""


def decoder_of(model: torch.nn.Module) -> torch.nn.Module:
    """The module that holds the decoder layers."""
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else None
    if decoder is None or not hasattr(decoder, "layers"):
        base = getattr(model, "model", None)
        decoder = base if base is not None and hasattr(base, "layers") else None
    if decoder is None:
        raise ValueError(f"{type(model).__name__}: cannot find the decoder layers; unsupported architecture")
    return decoder


def attention_modules(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The attention module of every decoder layer, in layer order."""
    modules = []
    for layer in decoder_of(model).layers:
        attn = getattr(layer, "self_attn", None)
        if attn is None or not hasattr(attn, "layer_idx"):
            raise ValueError(f"{type(layer).__name__} has no `self_attn` with a layer_idx; unsupported architecture")
        modules.append(attn)
    return modules


def hidden_states_of(args: tuple, kwargs: dict) -> torch.Tensor:
    """The hidden states a forward pre-hook (with kwargs) on an attention module sees entering it."""
    return kwargs.get("hidden_states", args[0] if args else None)


def install(model: torch.nn.Module) -> None:
    """Hook the model's decoder for HookedCaches (once per model; harmless for any other cache)."""
    register()
    if getattr(model, "_kvevict_installed", False):
        return
    decoder = decoder_of(model)
    attn_modules = attention_modules(model)
    config = decoder.config
    read_call = call_reader(decoder.forward)
    tokens: dict[int, object] = {}  # id(cache) -> its active-cache token
    # the implementation is the model's, shared by threads: switched by the first cache forward under way and
    # restored by the last one
    switch = {"forwards": 0, "previous": None, "lock": threading.Lock()}

    def before(module, args, kwargs):
        call = read_call(args, kwargs)
        cache = call["cache"]
        if not isinstance(cache, HookedCache):
            return
        x = call.get("input_ids")
        if x is None:
            x = call.get("inputs_embeds")
        if x is None:
            raise ValueError("EvictingCache needs input_ids or inputs_embeds passed to the model")
        ids = x if x.dim() == 2 and not x.is_floating_point() else None
        cache.begin_forward(x.shape[0], x.shape[1], call.get("attention_mask"), x.device, input_ids=ids)
        with switch["lock"]:
            if switch["forwards"] == 0:
                switch["previous"] = config._attn_implementation
                config._attn_implementation = ATTN_IMPLEMENTATION  # read by the mask builder and every attention
            switch["forwards"] += 1
        tokens[id(cache)] = activate(cache)

    def after(module, args, kwargs, output):
        cache = read_call(args, kwargs)["cache"]
        if not isinstance(cache, HookedCache) or id(cache) not in tokens:
            return
        deactivate(tokens.pop(id(cache)))
        with switch["lock"]:
            switch["forwards"] -= 1
            if switch["forwards"] == 0:
                config._attn_implementation = switch["previous"]
        cache.end_forward(failed=output is None)

    def layer_input(module, args, kwargs):
        cache = active_cache()
        if cache is not None:
            cache.layer_input(module.layer_idx, hidden_states_of(args, kwargs))

    decoder.register_forward_pre_hook(before, with_kwargs=True)
    decoder.register_forward_hook(after, with_kwargs=True, always_call=True)
    for attn in attn_modules:
        attn.register_forward_pre_hook(layer_input, with_kwargs=True)
    model._kvevict_installed = True
