"""CacheBatch: one decode step for many independent EvictingCaches, each row its own cache.

A server decodes many requests at once, each with its own policy state, length and eviction schedule. Rows join
and leave between steps (`add`, `remove`) without touching any other row's K/V: the batch holds references, not
copies. In a step the model's projections and MLPs run once for all rows; each row's K/V go to its own cache, and
attention runs per row over that row's kept entries (the same kernel the row would use alone), so a row decodes
as it would by itself and evicts on its own schedule (`decode_interval`, by its own policy).
"""

from __future__ import annotations

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
    steps.
    """

    def __init__(self, model: torch.nn.Module, caches: list[EvictingCache] | None = None):
        self.model = model
        self.caches: list[EvictingCache] = []
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

    # ------------------------------------------------------------------ forward bracketing (called by hooks)
    def begin_forward(self, batch: int, length: int, attention_mask, device, input_ids=None) -> None:
        if batch != len(self.caches):
            raise ValueError(f"this batch has {len(self.caches)} rows; got a forward with batch size {batch}")
        if length != 1:
            raise ValueError(f"a CacheBatch runs decode steps of one token per row, got {length}; prefill each "
                             "row's cache on its own first")
        if attention_mask is not None and not bool(attention_mask[:, -1].all()):
            raise ValueError("every row of a CacheBatch step decodes a real token (no padding)")
        started = []
        try:
            for row, cache in enumerate(self.caches):
                ids = None if input_ids is None else input_ids[row : row + 1]
                cache.begin_forward(1, 1, None, device, input_ids=ids)
                started.append(cache)
        except Exception:
            for cache in started:
                cache.end_forward(failed=True)
            raise

    def end_forward(self, failed: bool = False) -> None:
        for cache in self.caches:
            cache.end_forward(failed=failed)

    def layer_input(self, layer_idx: int, hidden_states: torch.Tensor) -> None:
        for row, cache in enumerate(self.caches):
            cache.layer_input(layer_idx, hidden_states[row : row + 1])

    # ------------------------------------------------------------------ transformers Cache protocol
    def update(self, key_states, value_states, layer_idx: int, *args, **kwargs):
        for row, cache in enumerate(self.caches):
            cache.update(key_states[row : row + 1], value_states[row : row + 1], layer_idx)
        return key_states, value_states  # attention reads each row's own view (attend)

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return max((cache.seen for cache in self.caches), default=0)

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
        return bool(self.caches) and all(cache.manages(module) for cache in self.caches)

    def attend(self, module, query, key, value, scaling, softcap=None) -> torch.Tensor:
        outputs = []
        for row, cache in enumerate(self.caches):
            view = cache.layers[module.layer_idx].current_view
            outputs.append(cache.attend(module, query[row : row + 1], view.keys, view.values, scaling, softcap))
        return torch.cat(outputs, dim=0)
