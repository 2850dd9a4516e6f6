"""The policy contract: a frozen configuration that starts one mutable state per cache.

A policy (`Policy` subclass) is a frozen dataclass of its method's parameters: made once by `make_policy`, it
serves any number of caches, threads or requests. Each cache calls `policy.start(geometry)` and gets a
`PolicyState`, which holds everything that changes (buffered queries, profiles, loaded gates) and receives the
hooks, each with an explicit context (contexts.py):

- `on_layer_input(layer, hidden, forward)` and `initial_stats(layer, forward)` as a forward stores new tokens;
- `observe(layer, ctx)` inside every attention call, with the layer's queries and the keys they attend to;
- `prepare_eviction(eviction)`, then `score(layer, ctx)` per layer (higher = more worth keeping; by default
  the configuration's `score(state, layer, ctx)`), then `select(...)`, which turns scores into keep masks that
  respect the target, the allocation and the protected tokens.

Policies never touch storage, and the cache never decides.
"""

from __future__ import annotations

import copy
import math
import numbers
import warnings
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING, ClassVar

import torch

from ..attention import attention_probs

if TYPE_CHECKING:
    from ..contexts import EvictionContext, ForwardContext, Geometry, LayerContext

ALLOCATIONS = ("uniform", "head", "global")


@dataclass(frozen=True)
class Policy:
    """Base class of every eviction policy's configuration.

    Sizing (exactly one of):
        compression_ratio: fraction of KV pairs removed, in [0, 1) (kvpress's convention). At each eviction
            the cache keeps ceil((1 - ratio) * tokens seen) tokens per (layer, KV head) on average.
        budget: tokens kept per (layer, KV head) on average; a fixed size that decoding maintains.
    Allocation of that size:
        "uniform": every KV head keeps the same number of tokens.
        "head": one threshold across the KV heads of a layer (AdaKV-style); each head keeps at least
            `head_floor` x its uniform share.
        "global": one threshold across all layers and KV heads (KVzip-style "pair level").
    Protected tokens (always kept; where they outnumber the target, the target rises to cover them):
        sink_tokens: the first tokens of each sequence; window: the most recent tokens.
    Timing:
        prefill_chunk: prompt tokens per forward pass in `kvevict.generate`/`answer` (eviction runs after each
            chunk, so peak memory is about budget + chunk); None = one pass.
        decode_interval: evict every this many decoded tokens; None = never evict while decoding.
    """

    compression_ratio: float = 0.0
    budget: int | None = None
    allocation: str = "uniform"
    head_floor: float | None = None
    sink_tokens: int = 0
    window: int = 0
    prefill_chunk: int | None = None
    decode_interval: int | None = 128

    name: ClassVar[str] = "base"
    # Whether the policy changes the forward pass itself (in-context eviction); such a policy cannot share a
    # prefill with others (see EvictingCache.fork).
    alters_forward: ClassVar[bool] = False
    # Parameters that only size or time the eviction; policies differing in these alone observe the same things.
    SIZING_PARAMS: ClassVar[frozenset[str]] = frozenset(
        {"compression_ratio", "budget", "allocation", "head_floor", "prefill_chunk", "decode_interval", "sink_tokens",
         "window"}
    )
    # Parameters that may be None (off, or a default decided later, e.g. from trained gates).
    OPTIONAL_PARAMS: ClassVar[frozenset[str]] = frozenset({"budget", "head_floor", "prefill_chunk", "decode_interval"})
    # How many of the most recent queries per layer `score` wants to see (SnapKV's observation window).
    query_window: ClassVar[int] = 0

    def __post_init__(self) -> None:
        self.validate()

    # ------------------------------------------------------------------ validation
    def validate(self) -> None:
        self._check_number("compression_ratio", 0.0, 1.0)
        self._check_count("budget", minimum=1)
        self._check_count("sink_tokens")
        self._check_count("window")
        if self.budget is not None:
            if self.compression_ratio:
                raise ValueError("give either compression_ratio or budget, not both")
            protected = (self.sink_tokens or 0) + (self.window or 0)
            if self.budget < protected:
                raise ValueError(
                    f"budget={self.budget} is smaller than the protected tokens "
                    f"(sink_tokens={self.sink_tokens} + window={self.window} = {protected})"
                )
        if self.allocation not in ALLOCATIONS:
            raise ValueError(f"allocation must be one of {ALLOCATIONS}, got {self.allocation!r}")
        self._check_number("head_floor", 0.0, 1.0, high_open=False)
        self.validate_schedule()

    def validate_schedule(self) -> None:
        """When eviction runs: after prefill chunks of `prefill_chunk` tokens, every `decode_interval` tokens."""
        self._check_count("prefill_chunk", minimum=1)
        self._check_count("decode_interval", minimum=1)

    def _check_count(self, name: str, minimum: int = 0, unit: str = "tokens") -> None:
        """Parameter `name` must be a whole number >= minimum (not a bool); numpy integers become int."""
        value = getattr(self, name)
        if value is None and name in self.OPTIONAL_PARAMS:
            return
        if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
            optional = " or None" if name in self.OPTIONAL_PARAMS else ""
            raise ValueError(f"{name} must be a whole number of {unit} >= {minimum}{optional}, got {value!r}")
        object.__setattr__(self, name, int(value))  # frozen: normalised once, here

    def _check_number(self, name: str, low: float, high: float, low_open: bool = False,
                      high_open: bool = True) -> None:
        """Parameter `name` must be a finite real number in the interval (not a bool); numpy numbers become float."""
        value = getattr(self, name)
        if value is None and name in self.OPTIONAL_PARAMS:
            return
        ok = not isinstance(value, bool) and isinstance(value, numbers.Real) and math.isfinite(value)
        if not (ok and (low < value if low_open else low <= value) and (value < high if high_open else value <= high)):
            if math.isinf(high):
                allowed = f"{'>' if low_open else '>='} {low:g}"
            else:
                allowed = f"in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
            optional = " or None" if name in self.OPTIONAL_PARAMS else ""
            raise ValueError(f"{name} must be {allowed}{optional}, got {value!r}")
        if type(value) not in (int, float):
            object.__setattr__(self, name, float(value))

    @property
    def evicts(self) -> bool:
        """Whether this policy ever removes anything."""
        return self.budget is not None or self.compression_ratio is None or self.compression_ratio > 0

    def params(self) -> dict:
        """The dataclass parameters (what a user passes to `make_policy`)."""
        return {f.name: getattr(self, f.name) for f in fields(self) if f.init}

    def describe(self) -> str:
        size = f"budget={self.budget}" if self.budget is not None else f"ratio={self.compression_ratio:g}"
        return f"{self.name}({size}, {self.allocation})"

    def observation_key(self) -> tuple:
        """Policies with equal keys observe the same things during a forward (they differ only in sizing)."""
        params = {k: v for k, v in self.params().items() if k not in self.SIZING_PARAMS}
        return (type(self), tuple(sorted((k, repr(v)) for k, v in params.items())))

    # ------------------------------------------------------------------ per-cache state
    State: ClassVar[type[PolicyState]]  # set below: the state class `start` makes (methods with state override it)

    def start(self, geometry: Geometry, tokenizer=None) -> PolicyState:
        """A fresh state for one cache of `geometry` (`tokenizer`: for policies that read token ids)."""
        return self.State(self, geometry, tokenizer)

    def score(self, state: PolicyState, layer_idx: int, ctx: LayerContext) -> torch.Tensor:
        """Importance of every slot of ctx.view: [B, H, L], higher = keep. Empty slots are ignored."""
        raise NotImplementedError(f"{type(self).__name__} defines no score()")


class PolicyState:
    """The mutable half of a policy, one per cache: what it observed, and the hooks the cache calls.

    Side channels it accumulates into live under `channel_prefix` in the cache's stores, so several states
    (an ObserverSet's members) never share one. `copy()` gives an independent state with the same observations.
    """

    # attributes a copy shares with the original instead of copying (read-only after start: gates, tokenizer)
    shared: ClassVar[tuple[str, ...]] = ("policy", "geometry", "tokenizer")

    def __init__(self, policy: Policy, geometry: Geometry, tokenizer=None):
        self.policy, self.geometry = policy, geometry
        self.tokenizer = tokenizer if tokenizer is not None else getattr(policy, "tokenizer", None)
        self.channel_prefix = ""
        self.queries: dict[int, list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]] = {}
        self._buffered: dict[int, int] = {}  # query positions held in `queries[layer]`
        self.warned_protected = False

    # ------------------------------------------------------------------ what the cache asks
    @property
    def compression_ratio(self) -> float:
        """The ratio this cache is sized by (a trained-gate policy takes its gates' own when given none)."""
        return self.policy.compression_ratio

    @property
    def budget(self) -> int | None:
        return self.policy.budget

    @property
    def evicts(self) -> bool:
        return self.budget is not None or self.compression_ratio > 0

    @property
    def observes(self) -> bool:
        """Whether the cache must call `observe` (by default only when something will be evicted)."""
        return self.evicts

    def describe(self) -> str:
        return self.policy.describe()

    def copy(self) -> PolicyState:
        """An independent state with the same observations (gates and tokenizer shared)."""
        memo = {id(getattr(self, name)): getattr(self, name) for name in self.shared if hasattr(self, name)}
        return copy.deepcopy(self, memo)

    def resized(self, policy: Policy) -> PolicyState:
        """A copy serving `policy`, which observes the same things as this state's policy but may size them
        differently (same observation key): one observed prefill, evicted several ways."""
        if policy.observation_key() != self.policy.observation_key():
            raise ValueError(f"cannot size what {self.policy.describe()} observed with {policy.describe()}")
        twin = self.copy()
        twin.policy = policy
        twin.channel_prefix = ""
        return twin

    # ------------------------------------------------------------------ hooks (all optional)
    def wants_layer_input(self) -> bool:
        return False

    def on_layer_input(self, layer_idx: int, hidden_states: torch.Tensor, forward: ForwardContext) -> None:
        """The hidden states entering a layer's attention module (before q/k/v). Gates score tokens here."""

    def initial_stats(self, layer_idx: int, forward: ForwardContext) -> dict | None:
        """Side-channel values for a layer's new tokens, {name: [B, H, T]}, stored with the rows."""
        return None

    def finish_forward(self, forward: ForwardContext, stores: list) -> None:
        """After every layer of a forward stored its tokens, before any eviction (not while the cache is frozen),
        for forwards with `forward.finishes`: a state that deferred the side channels of the forward's tokens
        writes them now, at the rows `stores[layer_idx].appended_rows`."""

    def observe(self, layer_idx: int, ctx: LayerContext) -> None:
        """Called in every attention call (not while the cache is frozen). Default: buffer recent queries."""
        if self.policy.query_window:
            self._buffer_queries(layer_idx, ctx)

    def key_visibility(self, layer_idx: int, ctx: LayerContext) -> torch.Tensor | None:
        """Optional [rows] bool over the layer's storage rows (`ctx.store`): False for keys hidden from later
        queries in this very forward (in-context eviction). A query always sees its own token."""
        return None

    def prepare_eviction(self, eviction: EvictionContext) -> None:
        """Called when an eviction is due, before any layer is scored (KVzip runs its scoring passes here)."""

    def score(self, layer_idx: int, ctx: LayerContext) -> torch.Tensor:
        return self.policy.score(self, layer_idx, ctx)

    def protected_prefix(self) -> int:
        """Tokens at the start of each sequence that are never evicted."""
        return self.policy.sink_tokens

    def recent_window(self, target: int, eviction: EvictionContext) -> int:
        """Most recent tokens protected when keeping `target` tokens per head."""
        return self.policy.window

    # ------------------------------------------------------------------ recent queries
    def _buffer_queries(self, layer_idx: int, ctx: LayerContext) -> None:
        """Keep the last `query_window` queries of the layer (chunks, joined lazily at scoring time)."""
        w = self.policy.query_window
        chunks = self.queries.setdefault(layer_idx, [])
        # clone: a slice would keep the whole prompt's query tensor alive
        positions = ctx.query_positions[-w:].clone()
        chunks.append((ctx.queries[..., -w:, :].detach().clone(), positions, ctx.query_valid[:, -w:].clone()))
        # a running count, not a sum over the chunks: decoding adds one chunk per token and layer
        buffered = self._buffered.get(layer_idx, 0) + positions.numel()
        while len(chunks) > 1 and buffered - chunks[0][1].numel() >= w:
            buffered -= chunks.pop(0)[1].numel()
        self._buffered[layer_idx] = buffered

    def recent_queries(self, layer_idx: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The buffered queries [B, H, G, w, d], their positions [w] and validity [B, w]."""
        chunks = self.queries[layer_idx]
        if len(chunks) > 1:
            w = self.policy.query_window
            joined = (torch.cat([c[0] for c in chunks], dim=-2)[..., -w:, :], torch.cat([c[1] for c in chunks])[-w:],
                      torch.cat([c[2] for c in chunks], dim=1)[:, -w:])
            self.queries[layer_idx] = [joined]
            self._buffered[layer_idx] = joined[1].numel()
        return self.queries[layer_idx][0]

    def recent_attention(self, layer_idx: int, ctx: LayerContext, scale: float | torch.Tensor | None = None
                         ) -> torch.Tensor:
        """Attention of the buffered recent queries over the kept keys: [B, H, G, w, L] (0 for padding queries)."""
        q, pos, ok = self.recent_queries(layer_idx)
        probs = attention_probs(
            q, ctx.view.keys, pos, ctx.view.positions, ctx.scaling if scale is None else scale,
            sliding_window=ctx.sliding_window,
        )
        return probs * ok[:, None, None, :, None]

    # ------------------------------------------------------------------ sizing and selection
    def target_tokens(self, tokens_seen: torch.Tensor) -> torch.Tensor:
        """Tokens to keep per (layer, KV head) for each batch row, given the real tokens seen: LongTensor [B]."""
        if self.budget is not None:
            return torch.full_like(tokens_seen, self.budget)
        keep = (1.0 - self.compression_ratio) * tokens_seen.double()
        # rounded first so float noise cannot add a token: (1 - 0.97) * 100 is 3.0000000000000027
        return torch.ceil(torch.round(keep * 1e9) / 1e9).long()

    def select(self, scores: dict[int, torch.Tensor], positions: dict[int, torch.Tensor],
               eviction: EvictionContext) -> dict[int, torch.Tensor]:
        """Keep masks per layer [B, H, L] from scores [B, H, L] and positions [B, H, L] (-1 = empty slot)."""
        targets = self.target_tokens(eviction.tokens_seen)  # [B]
        last_position = eviction.seen - 1
        windows = torch.tensor([self.recent_window(int(t), eviction) for t in targets.tolist()])  # [B]
        ranked = {}
        for layer, score in scores.items():
            pos = positions[layer].long()
            valid = pos >= 0
            score = score.float().masked_fill(~valid, float("-inf"))
            window = windows.to(pos.device)
            protected = valid & (
                (pos < (eviction.row_start.view(-1, 1, 1) + self.protected_prefix()))
                | (pos > last_position - window.view(-1, 1, 1))
            )
            ranked[layer] = torch.where(protected, torch.full_like(score, float("inf")), score)

        keep = self._allocate(ranked, targets)
        self._warn_if_protected_exceed(keep, targets, eviction)
        return keep

    def _allocate(self, ranked: dict[int, torch.Tensor], targets: torch.Tensor) -> dict[int, torch.Tensor]:
        """Keep masks from ranked scores (+inf = protected) and per-row targets, by the policy's allocation."""
        policy = self.policy
        if policy.allocation == "uniform":
            return {layer: top_k_mask(s, targets.view(-1, 1)) for layer, s in ranked.items()}
        floor = policy.head_floor if policy.head_floor is not None else (0.2 if policy.allocation == "head" else 0.0)
        floors = torch.floor(floor * targets.double()).long()
        lifted = {layer: _lift_top(s, floors) for layer, s in ranked.items()}
        if policy.allocation == "head":
            keep = {}
            for layer, s in lifted.items():
                B, H, L = s.shape
                mask = top_k_mask(s.reshape(B, 1, H * L), (targets * H).view(-1, 1))
                keep[layer] = mask.view(B, H, L)
            return keep
        # global: one threshold per batch row across every evictable layer and head
        layers = list(lifted)
        flat = torch.cat([lifted[layer].flatten(1) for layer in layers], dim=1)  # [B, sum(H*L)]
        total = targets * sum(lifted[layer].shape[1] for layer in layers)
        mask = top_k_mask(flat.unsqueeze(1), total.view(-1, 1)).squeeze(1)
        keep, offset = {}, 0
        for layer in layers:
            size = lifted[layer][0].numel()
            keep[layer] = mask[:, offset : offset + size].view_as(lifted[layer])
            offset += size
        return keep

    def _warn_if_protected_exceed(self, keep: dict[int, torch.Tensor], targets: torch.Tensor,
                                  eviction: EvictionContext) -> None:
        """Once per cache: say so when protected tokens lifted the kept count past the target."""
        if self.warned_protected or not keep:
            return
        kept = torch.stack([m.sum(-1) for m in keep.values()]).float().mean(dim=(0, 2))  # [B]
        if bool((kept > targets.float()).any()):  # only protected tokens can lift a head past its target
            self.warned_protected = True
            warnings.warn(
                f"{self.describe()}: protected tokens (sink_tokens={self.protected_prefix()}, "
                f"window={self.policy.window}) exceed the target on this short input and are all kept: "
                f"{[round(k, 1) for k in kept.tolist()]} tokens per head on average instead of the target "
                f"{targets.tolist()}, of {eviction.tokens_seen.tolist()} tokens seen (per batch row; warned once "
                "per cache)",
                stacklevel=2,
            )


Policy.State = PolicyState

def top_k_mask(scores: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """Mask of the k[b, h] highest scores along the last dim, never a -inf one and always every +inf one
    (protected entries: k rises to cover them); ties broken by order."""
    n = scores.shape[-1]
    if n == 0:
        return torch.zeros_like(scores, dtype=torch.bool)
    k = torch.maximum(k.expand(scores.shape[:-1]), (scores == float("inf")).sum(-1))
    order = scores.argsort(dim=-1, descending=True, stable=True)
    rank = torch.empty_like(order)
    rank.scatter_(-1, order, torch.arange(n, device=scores.device).expand_as(order))
    return (rank < k.unsqueeze(-1)) & (scores > float("-inf"))


def _lift_top(scores: torch.Tensor, floors: torch.Tensor) -> torch.Tensor:
    """Give each head's top floors[b] entries a score above every other entry (each head keeps at least that)."""
    if int(floors.max()) == 0:
        return scores
    B, H, L = scores.shape
    floor_mask = top_k_mask(scores, floors.view(B, 1).expand(B, H))
    return torch.where(floor_mask, scores + 1e30, scores).masked_fill(scores == float("inf"), float("inf"))


def pool1d(scores: torch.Tensor, kernel: int) -> torch.Tensor:
    """1-D average pooling over the last dim with 'same' padding (odd kernels), as SnapKV smooths its scores."""
    if kernel <= 1:
        return scores
    shape = scores.shape
    pooled = torch.nn.functional.avg_pool1d(
        scores.reshape(-1, 1, shape[-1]).float(), kernel_size=kernel, stride=1, padding=kernel // 2,
        count_include_pad=False,
    )
    return pooled.view(shape)


@dataclass(frozen=True)
class ObserverSet(Policy):
    """Observes a forward for several policies at once and evicts nothing.

    `EvictingCache.fork(policy)` then sizes the observed prefill for any member-like policy, so a sweep over
    policies and ratios prefills each context once. Each member keeps its own state and its own side channels.
    """

    members: tuple[Policy, ...] = ()
    name = "observer-set"

    def __init__(self, policies):
        unique = {}
        for policy in policies:
            unique.setdefault(policy.observation_key(), policy)
        object.__setattr__(self, "members", tuple(unique.values()))
        super().__init__()


class ObserverSetState(PolicyState):
    def __init__(self, policy: ObserverSet, geometry, tokenizer=None):
        super().__init__(policy, geometry, tokenizer)
        self.members: dict[tuple, PolicyState] = {}
        for number, member in enumerate(policy.members):
            state = member.start(geometry, tokenizer)
            state.channel_prefix = f"member{number}/"
            self.members[member.observation_key()] = state

    @property
    def observes(self) -> bool:
        return True

    @property
    def evicts(self) -> bool:
        return False

    def member_like(self, policy: Policy) -> PolicyState:
        """The member state that observed for `policy` (same observation key)."""
        key = policy.observation_key()
        if key not in self.members:
            raise ValueError(f"{policy.describe()} was not among the observed policies")
        return self.members[key]

    def wants_layer_input(self) -> bool:
        return any(m.wants_layer_input() for m in self.members.values())

    def on_layer_input(self, layer_idx, hidden_states, forward) -> None:
        for member in self.members.values():
            if member.wants_layer_input():
                member.on_layer_input(layer_idx, hidden_states, forward)

    def initial_stats(self, layer_idx, forward):
        merged = {}
        for member in self.members.values():
            stats = member.initial_stats(layer_idx, forward) or {}
            merged.update({member.channel_prefix + name: value for name, value in stats.items()})
        return merged or None

    def finish_forward(self, forward, stores) -> None:
        for member in self.members.values():
            member.finish_forward(forward, stores)

    def observe(self, layer_idx, ctx) -> None:
        for member in self.members.values():  # members observe whatever their own sizing (it is decided later)
            member.observe(layer_idx, ctx.within(member.channel_prefix))


ObserverSet.State = ObserverSetState
