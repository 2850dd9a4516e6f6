"""EvictingCache: a transformers `Cache` that stores only what a policy keeps, and frees the rest.

How it plugs into a model (no copied model code), see hooks.py: forward hooks on the decoder learn, before each
forward, how many tokens arrive and which are padding (from the 2-D attention mask), make this cache the one the
"kvevict" attention function (attention.py) reads, and run eviction after the forward. `update()` appends the new
K/V to the layer's compact store (storage.py) and returns a padded view of the kept entries; the attention
function masks that view by original positions.

The cache owns memory and never decides: its policy's per-cache state (`policy.start(geometry)`) observes and
scores through explicit contexts (contexts.py). Timing: after a forward of several tokens, or any forward inside
`prompt()` (a prompt chunk), the state's selection evicts down to its target; while decoding it evicts every
`decode_interval` tokens. Sliding-window layers (Gemma3) keep their window and are never scored.
"""

from __future__ import annotations

import copy
import weakref
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from .attention import evicted_attention, segment_attention, segments_apply
from .compat import CACHE_ARG, cache_kwargs
from .contexts import EvictionContext, ForwardContext, Geometry, LayerContext
from .hooks import HookedCache, install
from .policies.base import ObserverSetState, Policy, PolicyState
from .storage import LayerStore, PaddedView


class EvictingLayer(CacheLayerMixin):
    """One layer of an EvictingCache: its compact store, appends, views and the sliding-window trim."""

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

    def append(self, key_states, value_states, step: _Step, slack: int, stats: dict | None) -> PaddedView:
        """Store the forward's new K/V (padding dropped) and return the view attention reads."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        limit = None
        if not step.all_valid or step.length > self.store.min_free:  # else no segment grows: no limit needed
            limit = step.row_limit
            if self.is_sliding:  # the window, once trimmed after the forward, plus the next token
                window = torch.full_like(step.valid[:, 0], self.sliding_window, dtype=torch.long)
                limit = window if limit is None else torch.minimum(limit, window)
            if limit is not None:
                limit = limit.repeat_interleave(self.store.heads)
        self.store.append(key_states, value_states, step.positions, step.valid, slack, stats=stats,
                          all_valid=step.all_valid, limit=limit)
        self.current_view = self.store.view()
        return self.current_view

    def trim_window(self, seen: int, tokens_seen: torch.Tensor) -> None:
        """Drop the keys that left a sliding layer's window: the next query (position `seen`) sees keys with
        position > seen - window, window - 1 of them, plus one free row for the next token (compaction of an
        unchanged total size reuses the buffers in place)."""
        if self.store is None or self.store.max_len <= self.sliding_window - 1:
            return
        view = self.store.view()
        limit = tokens_seen.clamp(max=self.sliding_window).repeat_interleave(self.store.heads)
        self.store.compact(view.positions > seen - self.sliding_window, view, slack=1, limit=limit)

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.cache.seen + query_length, 0

    def get_seq_length(self) -> int:
        return self.cache.seen

    def get_max_length(self) -> int:
        return -1

    @property
    def evictable(self) -> bool:
        return not self.is_sliding


class EvictingCache(Cache, HookedCache):
    """KV cache that evicts (layer, KV head, token) entries chosen by `policy` and frees their memory.

    Usage: `model.generate(**inputs, cache=EvictingCache(model, policy))` (`past_key_values=` before transformers
    5.24), or plain forward calls. One policy serves any number of caches: each starts its own state. With no
    policy nothing is evicted. `tokenizer` is handed to policies that read token ids (FastGen, KVzip).
    Batches must be left-padded; padding tokens are never stored.
    """

    def __init__(self, model: torch.nn.Module, policy: Policy | None = None, tokenizer=None):
        if policy is not None and not isinstance(policy, Policy):
            raise TypeError(f"policy must be a kvevict Policy (see kvevict.make_policy), got {type(policy).__name__}")
        self.geometry = Geometry.of(model)
        config = model.config.get_text_config(decoder=True)
        layers = [EvictingLayer(self, idx, config.sliding_window if kind == "sliding" else None)
                  for idx, kind in enumerate(self.geometry.layer_kinds)]
        super().__init__(layers=layers)
        self.policy = policy
        self.state: PolicyState | None = None if policy is None else policy.start(self.geometry, tokenizer)
        self.model = model
        self.batch: int | None = None
        self.seen = 0  # logical length: every position processed so far, padding included
        self.tokens_seen: torch.Tensor | None = None  # [B] real (non-padding) tokens per row
        self.row_start: torch.Tensor | None = None  # [B] position of each row's first real token (-1: none yet)
        self.frozen = False
        self.phase = "prefill"  # "prefill" or "decode": what the forward that triggers an eviction was
        self.frozen_observer: PolicyState | None = None  # who observes inside a frozen block (KVzip's passes)
        self.prompt_chunks = False  # set by `prompt()`: every forward is a prompt chunk, even of one token
        self._steps_since_eviction = 0
        self._step: _Step | None = None
        install(model)

    @property
    def evicts(self) -> bool:
        return self.state is not None and self.state.evicts

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
        row_limit = self.tokens_seen + valid.sum(1) if self.evicts else None
        forward = ForwardContext(positions=positions, valid=valid, input_ids=input_ids, seen=self.seen,
                                 tokens_seen=self.tokens_seen, row_start=self.row_start, all_valid=all_valid,
                                 finishes=True)
        self._step = _Step(length=length, positions=positions, valid=valid, all_valid=all_valid, forward=forward,
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
        if self.state is not None and not self.frozen:
            self.state.finish_forward(step.forward, [layer.store for layer in self.layers])
        self.tokens_seen = self.tokens_seen + step.valid.sum(1)
        self.seen += step.length
        if self.frozen:  # nothing may move while frozen: the rows added are dropped on exit by truncation
            return
        for layer in self.layers:
            if layer.is_sliding:
                layer.trim_window(self.seen, self.tokens_seen)
        if not self.evicts:
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

    def layer_input(self, layer_idx: int, hidden_states: torch.Tensor) -> None:
        state = self.state
        if self.frozen or state is None or self._step is None or not state.wants_layer_input():
            return
        state.on_layer_input(layer_idx, hidden_states, self._step.forward)

    # ------------------------------------------------------------------ transformers Cache protocol
    def update(self, key_states, value_states, layer_idx: int, *args, **kwargs):
        step = self._step
        if step is None:
            raise RuntimeError(
                "EvictingCache.update was called outside a forward of the model it was built for; "
                f"pass it to that model as `{CACHE_ARG}=`"
            )
        layer = self.layers[layer_idx]
        decoding = step.length == 1 and not self.prompt_chunks
        # decoding grows each segment with room for the next tokens (not a copy of the layer per token); a cache
        # with no policy (a stacked one answering) grows like one that never evicts
        slack = ((self.policy.decode_interval if self.policy is not None else None) or 128) if decoding else 0
        stats = None
        if not (self.frozen or layer.is_sliding or self.state is None):
            stats = self.state.initial_stats(layer_idx, step.forward)
        view = layer.append(key_states, value_states, step, slack, stats)
        if not view.materialized:  # attend() reads the store (or gathers the view) itself
            return key_states[:, :, :0], value_states[:, :, :0]
        return view.keys, view.values

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
        raise NotImplementedError("EvictingCache cannot be reset; make a new cache")

    # ------------------------------------------------------------------ attention (called by attention.py)
    def manages(self, module) -> bool:
        idx = getattr(module, "layer_idx", None)
        return idx is not None and idx < len(self.layers) and self.layers[idx].current_view is not None

    def _layer_context(self, layer: EvictingLayer, view: PaddedView, state: PolicyState, seen: int,
                       tokens_seen: torch.Tensor) -> LayerContext:
        return LayerContext(layer.layer_idx, view, layer.store, layer.scaling or 1.0, row_start=self.row_start,
                            tokens_seen=tokens_seen, seen=seen, sliding_window=layer.sliding_window,
                            channel_prefix=state.channel_prefix)

    def attend(self, module, query, key, value, scaling, softcap=None) -> torch.Tensor:
        """Attention of `query` over the layer's kept entries. `key`/`value` are what `update()` returned: the
        layer's own view is read instead (the same entries), straight from the store where a per-segment kernel
        applies (decoding with heads of different lengths, a chunk after earlier ones)."""
        layer = self.layers[module.layer_idx]
        view, step = layer.current_view, self._step
        scaling = module.head_dim**-0.5 if scaling is None else scaling
        layer.scaling, layer.attended = scaling, True
        ctx = None
        visible = None
        observer = self.frozen_observer if self.frozen else self.state
        if layer.evictable and observer is not None:
            ctx = self._layer_context(layer, view, observer, step.forward.seen, step.forward.tokens_seen)
            visible = observer.key_visibility(module.layer_idx, ctx)
        store, T = layer.store, query.shape[2]
        # keys a gate hid: per segment only for one query (a decode step), where the mask is one row per segment
        per_segment = (softcap is None and layer.sliding_window is None
                       and ((T == 1 and (not view.no_empty_slots or visible is not None))
                            or (T > 1 and store.max_len > T and visible is None))
                       and segments_apply(store, step.positions, T))
        if per_segment:
            new_lse = [] if ctx is not None and observer.observes and T > 1 else None
            out = segment_attention(query, store.keys, store.values, store.host_start, store.host_len, scaling,
                                    visible, new_lse_out=new_lse)
            if new_lse:
                ctx.new_tokens_lse = new_lse[0]
        else:
            if visible is not None:  # per storage row -> laid out like the view
                visible = visible[view.row_index]
            lse = [] if ctx is not None and observer.observes and T > 1 else None
            out = evicted_attention(
                query, view.keys, view.values, step.positions, view.positions, scaling,
                sliding_window=layer.sliding_window, visible=visible, softcap=softcap,
                heads_aligned=view.heads_aligned, no_empty_slots=view.no_empty_slots, lse_out=lse,
            )
            if lse:
                ctx.attention_lse = lse[0]
        if ctx is not None and observer.observes:
            B, Hq, T, d = query.shape
            H = store.heads
            ctx.queries = query.reshape(B, H, Hq // H, T, d)
            ctx.query_positions, ctx.query_valid = step.positions, step.valid
            observer.observe(module.layer_idx, ctx)
        return out

    # ------------------------------------------------------------------ eviction
    def eviction_context(self) -> EvictionContext:
        """What an eviction now would be: its phase, what was seen, and a way to replay tokens (KVzip)."""
        return EvictionContext(phase=self.phase, seen=self.seen, tokens_seen=self.tokens_seen,
                               row_start=self.row_start, replay=self._replay)

    def _replay(self, input_ids: torch.Tensor, observer: PolicyState) -> None:
        """Run `input_ids` [1, n] after everything seen, observed by `observer` only, then forget them."""
        n = input_ids.shape[1]
        positions = torch.arange(self.seen, self.seen + n, device=input_ids.device).unsqueeze(0)
        mask = torch.ones(1, self.seen + n, dtype=torch.long, device=input_ids.device)
        with torch.no_grad(), self.frozen_tokens(observer=observer):
            self.model(input_ids=input_ids, attention_mask=mask, position_ids=positions, **cache_kwargs(self),
                       logits_to_keep=1)

    def evict(self, reserve: int = 0) -> None:
        """Score every evictable layer, select what stays, compact. `reserve`: free rows left per head."""
        state = self.state
        if state is None:
            return
        eviction = self.eviction_context()
        state.prepare_eviction(eviction)
        scores, positions, views = {}, {}, {}
        for layer in self.layers:
            if not layer.evictable or layer.store is None:
                continue
            view = layer.store.view()
            ctx = self._layer_context(layer, view, state, self.seen, self.tokens_seen)
            scores[layer.layer_idx] = state.score(layer.layer_idx, ctx)
            positions[layer.layer_idx] = view.positions
            # keep only what compaction needs: the K/V copies of a gathered view can go now
            views[layer.layer_idx] = PaddedView(None, None, view.positions, view.valid, view.row_index)
        if not scores:
            return
        keep = state.select(scores, positions, eviction)
        limit = self.tokens_seen  # a head never reserves more rows than the full cache holds for its row
        for idx, mask in keep.items():
            view = views[idx]
            if reserve == 0 and bool((mask | ~view.valid).all()):
                continue  # nothing to drop and no room to make
            store = self.layers[idx].store
            store.compact(mask, view, slack=reserve, limit=limit.repeat_interleave(store.heads))
        self._steps_since_eviction = 0

    def fork(self, policy: Policy) -> EvictingCache:
        """A copy of this cache that `policy` will manage, with what this cache's policy observed so far.

        With an `ObserverSet` as this cache's policy, one prefill can be sized by several policies and ratios:
        `cache.fork(make_policy("snapkv", compression_ratio=r)).evict()` for each r.
        """
        if self._step is not None:
            raise RuntimeError("cannot fork a cache in the middle of a forward")
        twin = EvictingCache(self.model, policy, tokenizer=None if self.state is None else self.state.tokenizer)
        source = None
        if twin.state.observes and self.state is not None:
            source = self.state.member_like(policy) if isinstance(self.state, ObserverSetState) else self.state
            # work every fork would repeat (KVzip's scoring passes) happens once, on the shared cache
            source.prepare_eviction(self.eviction_context())
            twin.state = source.resized(policy)
        twin.batch, twin.seen, twin.phase = self.batch, self.seen, self.phase
        twin.tokens_seen = None if self.tokens_seen is None else self.tokens_seen.clone()
        twin.row_start = None if self.row_start is None else self.row_start.clone()
        prefix = None if source is None else source.channel_prefix
        for mine, theirs in zip(self.layers, twin.layers):
            theirs.scaling = mine.scaling
            if mine.store is not None:
                store = copy.copy(mine.store)  # side channels: only the source state's, under plain names
                store.stats = {name[len(prefix):]: channel for name, channel in mine.store.stats.items()
                               if prefix is not None and name.startswith(prefix)}
                theirs.store = copy.deepcopy(store)
                theirs.is_initialized = True
        return twin

    @classmethod
    def stack(cls, caches: list[EvictingCache]) -> EvictingCache:
        """One cache whose batch rows are the rows of `caches` (same model, same positions seen), evicting nothing:
        e.g. several compressions of one context answering the same question in one batch."""
        first = caches[0]
        if any(c.model is not first.model or c.seen != first.seen or c._step is not None for c in caches):
            raise ValueError("stacked caches must come from the same model, have seen the same positions, and be idle")
        stacked = cls(first.model)
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

    # ------------------------------------------------------------------ prompts and frozen blocks
    @contextmanager
    def prompt(self):
        """Within this block every forward is a prompt chunk, whatever its size, and is evicted to target after
        it (outside, a one-token forward is a decode step). `kvevict.api.prefill` feeds prompts through it."""
        previous, self.prompt_chunks = self.prompt_chunks, True
        try:
            yield self
        finally:
            self.prompt_chunks = previous

    @contextmanager
    def frozen_tokens(self, observer: PolicyState | None = None):
        """Within this block nothing is evicted, and every token added is removed on exit.

        `kvevict.answer` uses it to append a question and its answer to a compressed context, then drop them.
        `observer` (a policy state) observes the attention of the added tokens: KVzip scores the context by the
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
        """What layer `layer_idx` holds: a list over batch rows of lists over KV heads of LongTensors, each the
        ascending original positions that head keeps, counted from the row's first real token (0 = that token)."""
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
    forward: ForwardContext  # what policy states are told of this forward
    row_limit: torch.Tensor | None = None  # [B] most rows a head of the row may reserve (real tokens seen after it)
