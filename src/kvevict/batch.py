"""CacheBatch: one decode step for many independent EvictingCaches, each row its own cache.

A server decodes many requests at once, each with its own policy state, length and eviction schedule. Rows join
and leave between steps (`add`, `remove`) without touching any other row's K/V: the batch holds references, not
copies. In a step the model's projections and MLPs run once for all rows; each row's K/V go to its own cache, and
attention runs per row over that row's kept entries (the same kernel the row would use alone), so a row decodes
as it would by itself and evicts on its own schedule (`decode_interval`, by its own policy).

A step may also carry one prompt chunk of a request being prefilled (`with batch.joining(cache, n)`): the
forward is then packed, one sequence of the chunk's n tokens followed by one token per row, so the rows decode
inside the chunk's forward instead of in a forward of their own (the projections of a few more tokens cost
little next to the chunk's). Attention still runs per cache over its own tokens: each is computed as alone.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from .cache import EvictingCache
from .hooks import HookedCache


class _BatchLayer(CacheLayerMixin):
    """What transformers asks of one layer of the batch (mask sizes); the rows' own layers hold the K/V."""

    is_compileable = False
    is_croppable = False

    def __init__(self, batch: CacheBatch, is_sliding: bool):
        super().__init__()
        self.batch, self.is_sliding = batch, is_sliding
        self.is_initialized = True

    def lazy_initialization(self, key_states, value_states) -> None:
        pass

    def update(self, key_states, value_states, *args, **kwargs):
        raise RuntimeError("CacheBatch updates its rows' caches, not its layers")

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.batch.get_seq_length() + query_length, 0

    def get_seq_length(self) -> int:
        return self.batch.get_seq_length()

    def get_max_length(self) -> int:
        return -1


class CacheBatch(Cache, HookedCache):
    """A decode batch over `caches` (EvictingCaches of one model, each holding one sequence).

    Usage: `model(input_ids=next_ids[:, None], position_ids=..., cache=batch)` (one new token per row, rows in
    the order of `batch.caches`; position_ids: each row's own next position). Rows are added and removed between
    steps. A packed step with a prompt chunk: see `joining`.
    """

    def __init__(self, model: torch.nn.Module, caches: list[EvictingCache] | None = None):
        self.model = model
        self.caches: list[EvictingCache] = []
        self._guest: tuple[EvictingCache, int] | None = None  # a prompt chunk riding the next forward
        # the forward under way: (cache, first index, tokens) per member; tokens are packed along the sequence
        # (dim 1 of input_ids) when `_packed`, else each member is a row of the batch (dim 0)
        self._members: list[tuple[EvictingCache, int, int]] = []
        self._packed = False
        probe = EvictingCache(model)  # the layer layout, from the same code that builds every row's cache
        super().__init__(layers=[_BatchLayer(self, layer.is_sliding) for layer in probe.layers])
        for cache in caches or []:
            self.add(cache)

    # ------------------------------------------------------------------ rows
    def add(self, cache: EvictingCache) -> None:
        """Append a row: a cache that already holds its sequence (prefilled) and is not in a forward."""
        if cache.model is not self.model:
            raise ValueError("every row of a CacheBatch must be a cache of the batch's model")
        if cache._step is not None or cache.frozen:
            raise ValueError("a cache can join a batch only between forwards, and not frozen")
        if cache.batch not in (None, 1):
            raise ValueError(f"each row of a CacheBatch is a cache of one sequence; this one holds {cache.batch}")
        if any(cache is row for row in self.caches):
            raise ValueError("this cache is already a row of the batch")
        self.caches.append(cache)

    def remove(self, cache: EvictingCache) -> None:
        """Drop a row (the cache itself is untouched: free it by dropping the last reference)."""
        for idx, row in enumerate(self.caches):
            if row is cache:
                del self.caches[idx]
                return
        raise ValueError("this cache is not a row of the batch")

    def __len__(self) -> int:
        return len(self.caches)

    @contextmanager
    def joining(self, cache: EvictingCache, tokens: int):
        """The forward inside this block also feeds `tokens` new tokens of `cache`, which is not a row (a request
        being prefilled; wrap it in `cache.prompt()` for a prompt chunk). The forward is packed:
        `model(input_ids=[chunk + next_ids], position_ids=[chunk positions + each row's next position],
        cache=batch, logits_to_keep=len(batch))`, one sequence of `tokens + len(batch)` tokens, the rows' logits
        last, in row order."""
        if any(cache is row for row in self.caches) or cache.model is not self.model:
            raise ValueError("the joining cache must be a cache of the batch's model and not one of its rows")
        if tokens < 1:
            raise ValueError(f"a joining chunk needs at least one token, got {tokens}")
        self._guest = (cache, tokens)
        try:
            yield self
        finally:
            self._guest = None

    # ------------------------------------------------------------------ forward bracketing (called by hooks)
    def begin_forward(self, batch: int, length: int, attention_mask, device, input_ids=None) -> None:
        if attention_mask is not None and not bool(attention_mask[:, -length:].all()):
            raise ValueError("every token of a CacheBatch step is a real token (no padding)")
        if self._guest is not None:
            guest, tokens = self._guest
            if (batch, length) != (1, tokens + len(self.caches)):
                raise ValueError(f"a packed step feeds one sequence of {tokens} chunk tokens + {len(self.caches)} "
                                 f"row tokens; got a forward of shape ({batch}, {length})")
            members = [(guest, 0, tokens)] + [(cache, tokens + row, 1) for row, cache in enumerate(self.caches)]
        else:
            if batch != len(self.caches):
                raise ValueError(f"this batch has {len(self.caches)} rows; got a forward with batch size {batch}")
            if length != 1:
                raise ValueError(f"a CacheBatch runs decode steps of one token per row, got {length}; prefill "
                                 "each row's cache on its own first, or join its chunk to a step (`joining`)")
            members = [(cache, row, 1) for row, cache in enumerate(self.caches)]
        self._members, self._packed = members, self._guest is not None
        started = []
        try:
            for cache, start, tokens in members:
                ids = None if input_ids is None else self._take(input_ids, start, tokens, 1)
                cache.begin_forward(1, tokens, None, device, input_ids=ids)
                started.append(cache)
        except Exception:
            for cache in started:
                cache.end_forward(failed=True)
            self._members = []
            raise

    def end_forward(self, failed: bool = False) -> None:
        members, self._members = self._members, []
        for cache, _, _ in members:
            cache.end_forward(failed=failed)

    def _take(self, tensor: torch.Tensor, start: int, tokens: int, token_dim: int) -> torch.Tensor:
        """One member's part of a batched tensor: its tokens along `token_dim` when packed, else its row."""
        if self._packed:
            return tensor.narrow(token_dim, start, tokens)
        return tensor[start : start + 1]

    def layer_input(self, layer_idx: int, hidden_states: torch.Tensor) -> None:
        for cache, start, tokens in self._members:
            cache.layer_input(layer_idx, self._take(hidden_states, start, tokens, 1))

    # ------------------------------------------------------------------ transformers Cache protocol
    def update(self, key_states, value_states, layer_idx: int, *args, **kwargs):
        for cache, start, tokens in self._members:  # [B, H, T, d]
            cache.update(self._take(key_states, start, tokens, 2), self._take(value_states, start, tokens, 2),
                         layer_idx)
        return key_states, value_states  # attention reads each member's own view (attend)

    def get_seq_length(self, layer_idx: int = 0) -> int:
        caches = self.caches + ([self._guest[0]] if self._guest is not None else [])
        return max((cache.seen for cache in caches), default=0)

    def get_mask_sizes(self, query_length: int, layer_idx: int = 0) -> tuple[int, int]:
        return self.get_seq_length() + query_length, 0

    def get_max_length(self, layer_idx: int | None = None) -> int:
        return -1

    def reorder_cache(self, beam_idx):
        raise NotImplementedError("CacheBatch does not support beam search")

    def crop(self, max_length: int):
        raise NotImplementedError("CacheBatch cannot be cropped")

    def reset(self):
        raise NotImplementedError("CacheBatch cannot be reset; remove its rows")

    # ------------------------------------------------------------------ attention (called by attention.py)
    def manages(self, module) -> bool:
        return bool(self._members) and all(cache.manages(module) for cache, _, _ in self._members)

    def attend(self, module, query, key, value, scaling, softcap=None) -> torch.Tensor:
        outputs = []
        for cache, start, tokens in self._members:  # query [B, Hq, T, d] -> output [B, T, Hq, d]
            view = cache.layers[module.layer_idx].current_view
            outputs.append(cache.attend(module, self._take(query, start, tokens, 2), view.keys, view.values,
                                        scaling, softcap))
        return torch.cat(outputs, dim=1 if self._packed else 0)
