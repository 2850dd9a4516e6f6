"""How many bytes of K/V a request can hold at its peak, before it runs: what admission control reserves.

The bound follows the cache's own rules (cache.py, storage.py), per evictable layer and KV head:
- a policy that sizes by a target (ratio or budget) holds at most K + chunk rows while a prompt chunk is being
  added (K = the target, or the protected tokens where they are more), and K + decode_interval + 1 rows while
  decoding (the rows reserved for the next interval); never more than the tokens seen;
- a policy that keeps what its own rule says (FastGen's profiles, Attention-Gate's flags) is bounded by the
  tokens seen; a cache that never evicts grows in steps of `decode_interval` (128 when unset) rows;
- a state that runs extra passes before an eviction (KVzip's repeat passes) may hold every seen token twice;
- a sliding-window layer holds its window plus one chunk.
Each row costs its K and V plus its metadata (an int32 position and one float32 per side channel); each layer
one sentinel row. Side channels are counted per policy by a calibration on a few tokens (`SideChannels`).
"""

from __future__ import annotations

import re
import threading
from dataclasses import dataclass

import torch

from ..contexts import EvictionContext, Geometry
from ..policies.base import Policy, PolicyState

_UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6, "g": 10**9, "gb": 10**9,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40, "tb": 10**12}


def parse_bytes(text: str | int) -> int:
    """'512MiB', '2GB', '1.5GiB', '1000000' -> bytes."""
    if isinstance(text, int) and not isinstance(text, bool):
        value = text
    else:
        match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:[eE][0-9]+)?)\s*([a-zA-Z]*)\s*", str(text))
        if not match or match.group(2).lower() not in _UNITS:
            raise ValueError(f"not a size: {text!r}; give bytes or a number with a unit, e.g. 512MiB or 2GB")
        value = int(float(match.group(1)) * _UNITS[match.group(2).lower()])
    if value <= 0:
        raise ValueError(f"a size must be positive, got {text!r}")
    return value


def format_bytes(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"


@dataclass(frozen=True)
class PeakEstimate:
    """Upper bounds of a request's K/V bytes: while its prompt is prefilled, and while it decodes."""

    prefill: int
    decode: int

    @property
    def peak(self) -> int:
        return max(self.prefill, self.decode)


def _sizes_by_target(state: PolicyState) -> bool:
    """Whether the state's selection keeps the target (the base selection): not FastGen's or Attention-Gate's."""
    return state.evicts and type(state).select is PolicyState.select


def _replays(state: PolicyState) -> bool:
    return type(state).prepare_eviction is not PolicyState.prepare_eviction


def _kept_per_head(state: PolicyState, tokens: int) -> int:
    """Most tokens a head keeps after an eviction with `tokens` seen: the target, or the protected tokens."""
    seen = torch.tensor([tokens])
    target = int(state.target_tokens(seen)[0])
    protected = 0
    for phase in ("prefill", "decode"):
        eviction = EvictionContext(phase=phase, seen=tokens, tokens_seen=seen, row_start=torch.zeros(1, dtype=torch.long))
        protected = max(protected, state.protected_prefix() + state.recent_window(target, eviction))
    return min(tokens, max(target, protected))


def predict_peak(geometry: Geometry, sliding_window: int | None, state: PolicyState, prompt_tokens: int,
                 max_new_tokens: int, chunk: int, side_channels: int) -> PeakEstimate:
    """Bounds of the bytes a cache with `state` holds for a prompt of `prompt_tokens` prefilled `chunk` tokens per
    forward and up to `max_new_tokens` generated tokens."""
    policy = state.policy
    final = prompt_tokens + max_new_tokens
    prompt = max(prompt_tokens - 1, 0)  # the last prompt token is the first decode step's input
    interval = policy.decode_interval
    row = 2 * geometry.head_dim * torch.empty((), dtype=geometry.dtype).element_size() + 4 + 4 * side_channels
    H = geometry.kv_heads
    prefill_rows = decode_rows = 0
    for kind in geometry.layer_kinds:
        if kind == "sliding":
            window = sliding_window or final
            prefill_rows += H * (min(prompt, window) + chunk)
            decode_rows += H * (min(final, window) + (interval or 128))
            continue
        if not state.evicts:
            prefill_rows += H * prompt
            decode_rows += H * (final + (interval or 128))
        elif not _sizes_by_target(state):
            prefill_rows += H * prompt
            decode_rows += H * final
        else:
            prefill_rows += H * min(prompt, _kept_per_head(state, prompt) + chunk)
            if interval is None:
                decode_rows += H * min(final + 128, _kept_per_head(state, prompt) + max_new_tokens + 128)
            else:
                decode_rows += H * min(final, _kept_per_head(state, final) + interval + 1)
        if _replays(state):
            prefill_rows += H * final
            decode_rows += H * final
    sentinels = len(geometry.layer_kinds)
    return PeakEstimate(prefill=(prefill_rows + sentinels) * row, decode=(decode_rows + sentinels) * row)


class SideChannels:
    """Side channels per row a policy's state creates, measured once per policy on a few tokens of the model."""

    def __init__(self, model, tokenizer):
        self.model, self.tokenizer = model, tokenizer
        self.counts: dict[tuple, int] = {}
        self.lock = threading.Lock()

    def of(self, policy: Policy) -> int:
        key = policy.observation_key()
        with self.lock:
            if key not in self.counts:
                self.counts[key] = self._measure(policy)
            return self.counts[key]

    def _measure(self, policy: Policy) -> int:
        from dataclasses import replace

        from ..api import prefill
        from ..cache import EvictingCache
        from ..compat import cache_kwargs

        probe = replace(policy, prefill_chunk=8, decode_interval=2) if policy.evicts else policy
        cache = EvictingCache(self.model, probe, tokenizer=self.tokenizer)
        device = next(self.model.parameters()).device
        vocab = self.model.config.get_text_config().vocab_size
        ids = torch.randint(min(10, vocab - 1), min(1000, vocab), (1, 24), generator=torch.Generator().manual_seed(0))
        ids = ids.to(device)
        with torch.no_grad():
            prefill(self.model, cache, ids[:, :-1], torch.ones_like(ids[:, :-1]), 8)
            nxt = ids[:, -1:]
            for _ in range(3):
                out = self.model(input_ids=nxt, position_ids=torch.tensor([[cache.seen]], device=device),
                                 **cache_kwargs(cache))
                nxt = out.logits[:, -1:].argmax(-1)
        return max((len(layer.store.stats) for layer in cache.layers if layer.store is not None), default=0)
