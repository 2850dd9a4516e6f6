"""EvictingCache: a transformers `Cache` that stores only what a policy keeps, and frees the rest.

How it plugs into a model (no copied model code):
- the model's attention implementation is set to "kvevict" (see attention.py), registered through
  transformers' AttentionInterface;
- forward hooks on the decoder learn, before each forward, how many tokens arrive and which are padding
  (from the 2-D attention mask), and run eviction after it; the cache is "active" in between, which is how
  the attention function finds it;
- `update()` appends the new K/V to the layer's compact store (storage.py) and returns a padded view of
  the kept entries; the attention function masks that view by original positions.

Timing: after a forward of several tokens (a prefill chunk) the policy evicts down to its target; while
decoding it evicts every `decode_interval` tokens. Sliding-window layers (Gemma3) keep their window and are
never scored.
"""

from __future__ import annotations

import contextvars
import copy
import weakref
import warnings
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from .attention import ATTN_IMPLEMENTATION, evicted_attention, register
from .compat import CACHE_ARG, call_reader
from .policies.base import Policy
from .storage import LayerStore, PaddedView

_ACTIVE: contextvars.ContextVar[EvictingCache | None] = contextvars.ContextVar("kvevict_active_cache", default=None)


def active_cache() -> EvictingCache | None:
    """The EvictingCache whose forward pass is running, if any."""
    return _ACTIVE.get()


@dataclass
class LayerContext:
    """What a policy sees of one layer: the kept entries and, inside attention, the queries reading them."""

    layer_idx: int
    view: PaddedView
    store: LayerStore
    scaling: float
    sliding_window: int | None = None
    queries: torch.Tensor | None = None  # [B, H, G, T, d], RoPE applied
    query_positions: torch.Tensor | None = None  # [T]
    query_valid: torch.Tensor | None = None  # [B, T], False for padding
    row_start: torch.Tensor | None = None  # [B] position of each row's first real token

    def relative_positions(self) -> torch.Tensor:
        """Kept positions counted from each row's first real token: [B, H, L] (-1 on empty slots)."""
        pos = self.view.positions.long()
        return torch.where(pos >= 0, pos - self.row_start.view(-1, 1, 1).clamp(min=0), -1)

    def stat(self, name: str) -> torch.Tensor:
        return self.store.gather_stat(name, self.view)

    def add_stat(self, name: str, amount: torch.Tensor) -> None:
        self.store.add_stat(name, self.view, amount)

    def set_stat(self, name: str, value: torch.Tensor) -> None:
        self.store.set_stat(name, self.view, value)


class EvictingLayer(CacheLayerMixin):
    """One layer of an EvictingCache. The cache drives it; this class answers transformers' layer protocol."""

    is_compileable = False
    is_croppable = False

    def __init__(self, cache: EvictingCache, layer_idx: int, sliding_window: int | None):
        super().__init__()
        self.cache, self.layer_idx = weakref.proxy(cache), layer_idx  # the cache owns its layers
        self.sliding_window = sliding_window
        self.is_sliding = sliding_window is not None
        self.store: LayerStore | None = None
        self.current_view: PaddedView | None = None
        self.scaling: float | None = None
        self.attended = False

    def lazy_initialization(self, key_states, value_states) -> None:
        B, H, _, d = key_states.shape
        self.store = LayerStore(B, H, d, key_states.dtype, key_states.device)
        self.is_initialized = True

    def update(self, key_states, value_states, *args, **kwargs):
        return self.cache.update(key_states, value_states, self.layer_idx)

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.cache.seen + query_length, 0

    def get_seq_length(self) -> int:
        return self.cache.seen

    def get_max_length(self) -> int:
        return -1

    @property
    def evictable(self) -> bool:
        return not self.is_sliding


class EvictingCache(Cache):
    """KV cache that evicts (layer, KV head, token) entries chosen by `policy` and frees their memory.

    Usage: `model.generate(**inputs, cache=EvictingCache(model, policy))` (`past_key_values=` before transformers
    5.24), or plain forward calls.
    Batches must be left-padded; padding tokens are never stored.
    """

    def __init__(self, model: torch.nn.Module, policy: Policy | None = None):
        from .policies import make_policy

        policy = make_policy("full") if policy is None else policy
        if not isinstance(policy, Policy):
            raise TypeError(f"policy must be a kvevict Policy (see kvevict.make_policy), got {type(policy).__name__}")
        config = model.config.get_text_config(decoder=True)
        layer_types = getattr(config, "layer_types", None) or ["full_attention"] * config.num_hidden_layers
        layers = []
        for idx, kind in enumerate(layer_types):
            if kind == "sliding_attention":
                layers.append(EvictingLayer(self, idx, config.sliding_window))
            elif kind in ("full_attention", "attention"):
                layers.append(EvictingLayer(self, idx, None))
            else:
                raise ValueError(f"layer {idx} has type {kind!r}; EvictingCache supports full and sliding attention layers")
        super().__init__(layers=layers)
        self.model_config = config
        self.policy = policy
        self.batch: int | None = None
        self.seen = 0  # logical length: every position processed so far, padding included
        self.tokens_seen: torch.Tensor | None = None  # [B] real (non-padding) tokens per row
        self.row_start: torch.Tensor | None = None  # [B] position of each row's first real token (-1: none yet)
        self.frozen = False
        self.phase = "prefill"  # "prefill" or "decode": what the forward that triggers an eviction was
        self.frozen_observer: Policy | None = None  # who observes inside a frozen block (KVzip's scoring passes)
        self.prompt_chunks = False  # set by `prompt()`: every forward is a prompt chunk, even of one token
        self._steps_since_eviction = 0
        self._step: _Step | None = None
        self._warned_protected = False
        self.model = model
        install(model)
        policy.bind(self)

    # ------------------------------------------------------------------ forward bracketing (called by hooks)
    def begin_forward(self, batch: int, length: int, attention_mask: torch.Tensor | None, device,
                      input_ids: torch.Tensor | None = None) -> None:
        if self.batch is None:
            self.batch = batch
            self.tokens_seen = torch.zeros(batch, dtype=torch.long, device=device)
            self.row_start = torch.full((batch,), -1, dtype=torch.long, device=device)
        elif batch != self.batch:
            raise ValueError(f"this cache holds batch size {self.batch}; got a forward with batch size {batch}")
        if attention_mask is None:
            valid = torch.ones(batch, length, dtype=torch.bool, device=device)
        else:
            if attention_mask.dim() != 2:
                raise ValueError("EvictingCache needs a 2-D padding attention_mask (or none), not a prepared 4-D mask")
            if attention_mask.shape[1] != self.seen + length:
                if self.seen and attention_mask.shape[1] == length:
                    raise ValueError(
                        f"this cache already holds {self.seen} tokens of another sequence; make a new cache per prompt"
                    )
                raise ValueError(
                    f"attention_mask covers {attention_mask.shape[1]} positions; expected tokens already seen "
                    f"({self.seen}) + new tokens ({length})"
                )
            valid = attention_mask[:, -length:].to(device=device, dtype=torch.bool)
        positions = torch.arange(self.seen, self.seen + length, device=device)
        first_real = torch.where(valid.any(1), valid.float().argmax(1) + self.seen, -1)
        self.row_start = torch.where(self.row_start < 0, first_real, self.row_start)
        all_valid = attention_mask is None or bool(valid.all())
        # an evicting cache never reserves more rows for a head than the full cache would hold for its row
        row_limit = self.tokens_seen + valid.sum(1) if self.policy.evicts else None
        self._step = _Step(length=length, positions=positions, valid=valid, all_valid=all_valid, input_ids=input_ids,
                           row_limit=row_limit)
        for layer in self.layers:
            layer.attended = False

    def end_forward(self, failed: bool = False) -> None:
        step, self._step = self._step, None
        if step is None or failed:
            return
        if any(layer.store is not None and not layer.attended for layer in self.layers if layer.current_view is not None):
            raise RuntimeError(
                "a layer stored K/V in the EvictingCache but its attention did not go through kvevict's attention "
                "path; this architecture cannot be used with EvictingCache"
            )
        for layer in self.layers:
            layer.current_view = None
        self.tokens_seen += step.valid.sum(1)
        self.seen += step.length
        if self.frozen:  # nothing may move while frozen: the rows added are dropped on exit by truncation
            return
        self._trim_sliding_layers()
        if not self.policy.evicts:
            return
        if step.length > 1 or self.prompt_chunks:
            self.phase = "prefill"
            self.evict(reserve=0)
        else:
            self.phase = "decode"
            self._steps_since_eviction += 1
            interval = self.policy.decode_interval
            if interval is not None and self._steps_since_eviction >= interval:
                self.evict(reserve=interval)

    @property
    def current_tokens_valid(self) -> torch.Tensor | None:
        """Which tokens of the forward in progress are real (not padding): [B, T]; None between forwards."""
        return None if self._step is None else self._step.valid

    # ------------------------------------------------------------------ transformers Cache protocol
    def update(self, key_states, value_states, layer_idx: int, *args, **kwargs):
        step = self._step
        if step is None:
            raise RuntimeError(
                "EvictingCache.update was called outside a forward of the model it was built for; "
                f"pass it to that model as `{CACHE_ARG}=`"
            )
        layer = self.layers[layer_idx]
        if not layer.is_initialized:
            layer.lazy_initialization(key_states, value_states)
        decoding = step.length == 1 and not self.prompt_chunks
        slack = (self.policy.decode_interval or 128) if decoding else 0
        limit = step.row_limit
        if layer.is_sliding:  # the window, once trimmed after the forward, plus the next token
            window = torch.full_like(step.valid[:, 0], layer.sliding_window, dtype=torch.long)
            limit = window if limit is None else torch.minimum(limit, window)
        if limit is not None:
            limit = limit.repeat_interleave(layer.store.heads)
        stats = None if self.frozen or layer.is_sliding else self.policy.initial_stats(layer_idx, step.input_ids, step.positions)
        layer.store.append(key_states, value_states, step.positions, step.valid, slack, stats=stats,
                           all_valid=step.all_valid, limit=limit)
        layer.current_view = layer.store.view()
        return layer.current_view.keys, layer.current_view.values

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.seen

    def get_mask_sizes(self, query_length: int, layer_idx: int = 0) -> tuple[int, int]:
        return self.seen + query_length, 0

    def get_max_length(self, layer_idx: int | None = None) -> int:
        return -1

    def reorder_cache(self, beam_idx):
        raise NotImplementedError("EvictingCache does not support beam search")

    def batch_repeat_interleave(self, repeats: int):
        raise NotImplementedError("EvictingCache does not support num_return_sequences > 1 or beam search")

    def batch_select_indices(self, indices):
        raise NotImplementedError("EvictingCache does not support selecting batch rows")

    def crop(self, max_length: int):
        raise NotImplementedError("EvictingCache cannot be cropped (assisted decoding is not supported)")

    def reset(self):
        raise NotImplementedError("EvictingCache cannot be reset; make a new cache (and policy)")

    # ------------------------------------------------------------------ attention (called by attention.py)
    def manages(self, module) -> bool:
        idx = getattr(module, "layer_idx", None)
        return idx is not None and idx < len(self.layers) and self.layers[idx].current_view is not None

    def attend(self, module, query, key, value, scaling, softcap=None) -> torch.Tensor:
        layer = self.layers[module.layer_idx]
        view, step = layer.current_view, self._step
        scaling = module.head_dim**-0.5 if scaling is None else scaling
        layer.scaling, layer.attended = scaling, True
        ctx = None
        visible = None
        observer = self.frozen_observer if self.frozen else self.policy
        if layer.evictable and observer is not None:
            ctx = LayerContext(module.layer_idx, view, layer.store, scaling, row_start=self.row_start)
            visible = observer.key_visibility(module.layer_idx, ctx)
        out = evicted_attention(
            query, key, value, step.positions, view.positions, scaling,
            sliding_window=layer.sliding_window, visible=visible, softcap=softcap,
            heads_aligned=view.heads_aligned, no_empty_slots=view.no_empty_slots,
        )
        if ctx is not None and observer.observes:
            B, Hq, T, d = query.shape
            H = key.shape[1]
            ctx.queries = query.reshape(B, H, Hq // H, T, d)
            ctx.query_positions, ctx.query_valid = step.positions, step.valid
            observer.observe(module.layer_idx, ctx)
        return out

    # ------------------------------------------------------------------ eviction
    def evict(self, reserve: int = 0) -> None:
        """Score every evictable layer, select what stays, compact. `reserve`: free rows left per head."""
        self.policy.prepare_eviction()
        scores, positions, views = {}, {}, {}
        for layer in self.layers:
            if not layer.evictable or layer.store is None:
                continue
            view = layer.store.view()
            ctx = LayerContext(layer.layer_idx, view, layer.store, layer.scaling or 1.0, row_start=self.row_start)
            scores[layer.layer_idx] = self.policy.score(layer.layer_idx, ctx)
            positions[layer.layer_idx] = view.positions
            # keep only what compaction needs: the K/V copies of a gathered view can go now
            views[layer.layer_idx] = PaddedView(None, None, view.positions, view.valid, view.row_index)
        if not scores:
            return
        keep = self.policy.select(scores, positions, self.row_start, self.tokens_seen, self.seen - 1)
        self._warn_if_protected_exceeds_target(keep, views)
        limit = self.tokens_seen  # a head never reserves more rows than the full cache holds for its row
        for idx, mask in keep.items():
            view = views[idx]
            if reserve == 0 and bool((mask | ~view.valid).all()):
                continue  # nothing to drop and no room to make
            store = self.layers[idx].store
            store.compact(mask, view, slack=reserve, limit=limit.repeat_interleave(store.heads))
        self._steps_since_eviction = 0
        self.policy.after_eviction()

    def _trim_sliding_layers(self) -> None:
        for layer in self.layers:
            if not layer.is_sliding or layer.store is None:
                continue
            window = layer.sliding_window
            if layer.store.max_len <= window - 1:
                continue
            view = layer.store.view()
            # the next query (position `seen`) sees keys with position > seen - window: window - 1 of them, and
            # one free row for the next token (same total size: compaction reuses the buffers in place)
            limit = self.tokens_seen.clamp(max=window).repeat_interleave(layer.store.heads)
            layer.store.compact(view.positions > self.seen - window, view, slack=1, limit=limit)

    def _warn_if_protected_exceeds_target(self, keep, views) -> None:
        if self._warned_protected:
            return
        targets = self.policy.target_tokens(self.tokens_seen)
        kept = torch.stack([m.sum(-1) for m in keep.values()]).float().mean(dim=(0, 2))  # [B]
        if bool((kept > targets.float()).any()):  # only protected tokens can lift a head past its target
            self._warned_protected = True
            warnings.warn(
                f"{self.policy.describe()}: protected tokens (sink_tokens={self.policy.sink_tokens}, "
                f"window={self.policy.window}) exceed the target on this short input and are all kept: "
                f"{[round(k, 1) for k in kept.tolist()]} tokens per head on average instead of the target "
                f"{targets.tolist()}, of {self.tokens_seen.tolist()} tokens seen (per batch row; warned once per cache)",
                stacklevel=3,
            )

    def fork(self, policy: Policy) -> EvictingCache:
        """A copy of this cache that `policy` will manage, with what this cache's policy observed so far.

        With an `ObserverSet` as this cache's policy, one prefill can be sized by several policies and ratios:
        `cache.fork(make_policy("snapkv", compression_ratio=r)).evict()` for each r.
        """
        from .policies.base import ObserverSet

        if self._step is not None:
            raise RuntimeError("cannot fork a cache in the middle of a forward")
        twin = EvictingCache(self.model, policy)
        if policy.observes:
            source = self.policy.member_like(policy) if isinstance(self.policy, ObserverSet) else self.policy
            if source is not policy:
                source.prepare_eviction()  # work every fork would repeat (KVzip's scoring passes) happens once
                policy.copy_observations(source)
        twin.batch, twin.seen = self.batch, self.seen
        twin.tokens_seen = None if self.tokens_seen is None else self.tokens_seen.clone()
        twin.row_start = None if self.row_start is None else self.row_start.clone()
        for mine, theirs in zip(self.layers, twin.layers):
            theirs.scaling = mine.scaling
            if mine.store is not None:
                theirs.store = copy.deepcopy(mine.store)
                theirs.is_initialized = True
        return twin

    @classmethod
    def stack(cls, caches: list[EvictingCache]) -> EvictingCache:
        """One cache whose batch rows are the rows of `caches` (same model, same positions seen), kept by the
        `full` policy: e.g. several compressions of one context answering the same question in one batch."""
        from .policies import make_policy

        first = caches[0]
        if any(c.model is not first.model or c.seen != first.seen or c._step is not None for c in caches):
            raise ValueError("stacked caches must come from the same model, have seen the same positions, and be idle")
        stacked = cls(first.model, make_policy("full"))
        stacked.batch = sum(c.batch for c in caches)
        stacked.seen = first.seen
        stacked.tokens_seen = torch.cat([c.tokens_seen for c in caches])
        stacked.row_start = torch.cat([c.row_start for c in caches])
        for idx, layer in enumerate(stacked.layers):
            stores = [c.layers[idx].store for c in caches]
            if any(s is None for s in stores):
                continue
            layer.store = LayerStore.concat(stores)
            layer.scaling = first.layers[idx].scaling
            layer.is_initialized = True
        return stacked

    @contextmanager
    def prompt(self):
        """Within this block every forward is a prompt chunk, whatever its size, and is evicted to target after
        it (outside, a one-token forward is a decode step). `kvevict.api.prefill` feeds prompts through it."""
        previous, self.prompt_chunks = self.prompt_chunks, True
        try:
            yield self
        finally:
            self.prompt_chunks = previous

    # ------------------------------------------------------------------ freezing (compress once, ask many)
    @contextmanager
    def frozen_tokens(self, observer: Policy | None = None):
        """Within this block nothing is evicted, and every token added is removed on exit.

        `kvevict.answer` uses it to append a question and its answer to a compressed context, then drop them.
        `observer` (a policy) observes the attention of the added tokens: KVzip scores the context by the
        attention of a temporary "repeat the context" pass. Nobody else observes.
        """
        if self.frozen:
            raise RuntimeError("cache is already frozen")
        saved = (
            self.seen,
            self.tokens_seen.clone() if self.tokens_seen is not None else None,
            self.row_start.clone() if self.row_start is not None else None,
            [(layer.store.seg_len.clone(), layer.store.seg_cap.clone()) if layer.store is not None else None
             for layer in self.layers],
        )
        self.frozen, self.frozen_observer = True, observer
        try:
            yield self
        finally:
            self.frozen, self.frozen_observer = False, None
            self.seen, self.tokens_seen, self.row_start, lengths = saved
            for layer, length in zip(self.layers, lengths):
                if layer.store is None:
                    continue
                if length is None:
                    layer.store = None
                    layer.is_initialized = False
                else:
                    layer.store.truncate(*length)

    # ------------------------------------------------------------------ inspection
    def nbytes(self) -> int:
        """Bytes of K/V storage held right now (kept rows, free slots, and per-row metadata)."""
        return sum(layer.store.nbytes() for layer in self.layers if layer.store is not None)

    def full_nbytes(self) -> int:
        """Bytes the same tokens would take in an unevicted cache (sliding layers: their window)."""
        total = 0
        for layer in self.layers:
            store = layer.store
            if store is None:
                continue
            row_bytes = 2 * store.head_dim * store.keys.element_size() * store.heads
            tokens = self.tokens_seen
            if layer.is_sliding:
                tokens = tokens.clamp(max=layer.sliding_window)
            total += int(tokens.sum()) * row_bytes
        return total

    def kept_counts(self) -> torch.Tensor:
        """Tokens kept per layer, batch row and KV head: LongTensor [num_layers, batch, kv_heads]."""
        counts = [layer.store.kept_counts() for layer in self.layers if layer.store is not None]
        if len(counts) != len(self.layers):
            raise RuntimeError("the cache is empty: run a forward pass first")
        return torch.stack(counts).cpu()

    def kept_positions(self, layer_idx: int) -> list[list[torch.Tensor]]:
        """Original positions kept in `layer_idx`, per batch row and KV head (0 = the row's first real token)."""
        store = self.layers[layer_idx].store
        if store is None:
            raise RuntimeError("the cache is empty: run a forward pass first")
        view = store.view()
        out = []
        for b in range(store.batch):
            out.append([(view.positions[b, h][view.valid[b, h]].long() - self.row_start[b]).cpu() for h in range(store.heads)])
        return out

    def compression(self) -> float:
        """Fraction of the unevicted cache's bytes that eviction saved (K/V only, excluding metadata)."""
        full = self.full_nbytes()
        if full == 0:
            return 0.0
        kept = 0
        for layer in self.layers:
            if layer.store is not None:
                kept += int(layer.store.seg_len.sum()) * 2 * layer.store.head_dim * layer.store.keys.element_size()
        return 1.0 - kept / full


@dataclass
class _Step:
    length: int
    positions: torch.Tensor  # [T]
    valid: torch.Tensor  # [B, T]
    all_valid: bool  # no padding among the new tokens
    input_ids: torch.Tensor | None = None  # [B, T] when the forward got token ids
    row_limit: torch.Tensor | None = None  # [B] most rows a head of the row may reserve (real tokens seen after it)


# ---------------------------------------------------------------------------------------------- hooks
def _decoder(model: torch.nn.Module) -> torch.nn.Module:
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
    for layer in _decoder(model).layers:
        attn = getattr(layer, "self_attn", None)
        if attn is None or not hasattr(attn, "layer_idx"):
            raise ValueError(f"{type(layer).__name__} has no `self_attn` with a layer_idx; unsupported architecture")
        modules.append(attn)
    return modules


def install(model: torch.nn.Module) -> None:
    """Route the model's attention through kvevict and hook its decoder (once per model)."""
    register()
    if getattr(model, "_kvevict_installed", False):
        _ensure_attention_impl(model)
        return
    decoder = _decoder(model)
    attn_modules = attention_modules(model)
    _ensure_attention_impl(model)

    read_call = call_reader(decoder.forward)

    def before(module, args, kwargs):
        call = read_call(args, kwargs)
        cache = call["cache"]
        if not isinstance(cache, EvictingCache):
            return
        impl = model.config._attn_implementation
        if impl != ATTN_IMPLEMENTATION:
            raise ValueError(
                f"the model's attn_implementation is {impl!r}; EvictingCache needs {ATTN_IMPLEMENTATION!r} "
                "(it is set when the cache is created; do not change it afterwards)"
            )
        x = call.get("input_ids")
        if x is None:
            x = call.get("inputs_embeds")
        if x is None:
            raise ValueError("EvictingCache needs input_ids or inputs_embeds passed to the model")
        ids = x if x.dim() == 2 and not x.is_floating_point() else None
        cache.begin_forward(x.shape[0], x.shape[1], call.get("attention_mask"), x.device, input_ids=ids)
        cache._token = _ACTIVE.set(cache)

    def after(module, args, kwargs, output):
        cache = read_call(args, kwargs)["cache"]
        if not isinstance(cache, EvictingCache) or getattr(cache, "_token", None) is None:
            return
        _ACTIVE.reset(cache._token)
        cache._token = None
        cache.end_forward(failed=output is None)

    def layer_input(module, args, kwargs):
        cache = _ACTIVE.get()
        if cache is None or cache.frozen or not cache.policy.wants_layer_input():
            return
        hidden = kwargs.get("hidden_states", args[0] if args else None)
        cache.policy.on_layer_input(module.layer_idx, hidden)

    decoder.register_forward_pre_hook(before, with_kwargs=True)
    decoder.register_forward_hook(after, with_kwargs=True, always_call=True)
    for attn in attn_modules:
        attn.register_forward_pre_hook(layer_input, with_kwargs=True)
    model._kvevict_installed = True


def _ensure_attention_impl(model: torch.nn.Module) -> None:
    if model.config._attn_implementation == ATTN_IMPLEMENTATION:
        return
    if hasattr(model, "set_attn_implementation"):
        model.set_attn_implementation(ATTN_IMPLEMENTATION)
    else:
        model.config._attn_implementation = ATTN_IMPLEMENTATION
