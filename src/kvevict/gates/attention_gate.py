"""Attention-Gate: a small attention block per attention layer that flags which tokens later queries may see.

Zeng et al., "In-context KV-Cache Eviction for LLMs via Attention-Gate" (arXiv 2410.12876). Before each
attention layer, a lightweight module reads the layer's input hidden states (after the input norm: the tensor
that feeds the q/k/v projections) and emits, per token and KV head, a keep probability p. The hard flag is
p >= tau; training passes gradients through the threshold with a straight-through estimator (STE):
m = hard + p - p.detach(). The model's attention then obeys the flags in-context: a flagged (evicted) key is
seen by no later query (only by its own position), and only kept entries are cached.

The paper does not publish the module's size, its threshold or its eviction loss. Our choices, all parameters of
`GateConfig` and recorded in every checkpoint's JSON:

- Size: the hidden state (D) is projected to `proj_dim` = 32 features, from which `heads` = 4 heads of
  `head_dim` = 16 build q, k and v (RMS-normalised q and k, as Fast KVzip's gate does). The keep logit of each
  KV head is a linear read-out of [attention output ; projected token]. For SmolLM2-135M that is about 25k
  parameters per layer (0.56% of the model), 3 MB in float32 for all 30 layers.
- Context: a causal attention over a bounded local window of `window` = 64 tokens (the token itself and the 63
  before it), with a learned bias per head and distance instead of RoPE. A gate that attended over the whole
  context would need its own cache growing with the context, a good part of the memory it is meant to free;
  the window caps the gate's state at `window - 1` projected keys and values per layer and batch row (32 KB per
  layer in float32), a rolling buffer carried across forwards so decoding flags each new token exactly as a
  prefill of the same text would.
- tau = 0.5. The first `sink_tokens` = 4 tokens of each sequence are always kept (attention sinks) and each query
  always sees its own position. `recent_window` (default 1, the paper's rule: the flag acts at once) widens the
  latter: each query sees the keys of its `recent_window` newest positions whatever their flags, so a flagged key
  leaves only once that many queries have passed it. Gates trained with a wider one are an experiment
  (benchmarks/attention_gate_recent_window.py evaluates them); the cache runs the paper's rule only.
- Eviction loss (in the trainer): lambda * sum over gated layers of (mean keep flag of the layer - (1 - r))^2,
  r = the target compression ratio; the mean runs over the STE flags of the evictable (non-sink) tokens.

Gemma3's sliding-window layers are never gated (the cache never evicts them); only full-attention layers are.

The gate runs in float32 whatever the model's dtype, so flags do not depend on the model's precision beyond the
hidden states themselves.
"""

from __future__ import annotations

import contextvars
import json
import math
from contextlib import contextmanager
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..attention import FUSED_CPU, flagged_prefill
from ..compat import attention_implementation
from ..models import config_of

KIND = "attention-gate"
TRAINING_ATTENTION = "kvevict_attention_gate"  # the differentiable flagged attention, for training and checks


@dataclass
class GateConfig:
    """Hyper-parameters of one model's Attention-Gates (saved in gates.json under "hyper").

    heads, head_dim: the gate's own attention heads and their size. proj_dim: features the hidden state is
    projected to first. window: tokens each gate query attends to (itself included). tau: keep threshold on the
    probability. sink_tokens: first tokens of each sequence that are always kept. target_ratio: the compression
    ratio the gates were trained for (fraction of KV pairs evicted). recent_window: each query sees the keys of its
    recent_window newest positions (itself included) whatever their flags; 1 = only its own.
    """

    heads: int = 4
    head_dim: int = 16
    proj_dim: int = 32
    window: int = 64
    tau: float = 0.5
    sink_tokens: int = 4
    target_ratio: float = 0.5
    recent_window: int = 1

    def __post_init__(self) -> None:
        for name in ("heads", "head_dim", "proj_dim", "window", "recent_window"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if not 0.0 < self.tau < 1.0:
            raise ValueError(f"tau must be in (0, 1), got {self.tau!r}")
        if not isinstance(self.sink_tokens, int) or self.sink_tokens < 0:
            raise ValueError(f"sink_tokens must be an integer >= 0, got {self.sink_tokens!r}")
        if not 0.0 <= self.target_ratio < 1.0:
            raise ValueError(f"target_ratio must be in [0, 1), got {self.target_ratio!r}")

    @classmethod
    def from_dict(cls, values: dict) -> GateConfig:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in values.items() if k in known})

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class GateState:
    """The rolling context of one layer's gate: the last `window - 1` projected keys/values per batch row."""

    keys: torch.Tensor  # [B, heads, P, head_dim]
    values: torch.Tensor  # [B, heads, P, head_dim]
    valid: torch.Tensor  # [B, P] bool (False: padding)
    all_valid: bool | None = None  # whether every slot holds a token, where known without a device sync


class AttentionGate(nn.Module):
    """One attention layer's gate: hidden states [B, T, D] -> keep probabilities [B, T, kv_heads]."""

    def __init__(self, hidden_size: int, kv_heads: int, config: GateConfig):
        super().__init__()
        self.config = config
        inner = config.heads * config.head_dim
        self.proj = nn.Linear(hidden_size, config.proj_dim)
        self.q = nn.Linear(config.proj_dim, inner, bias=False)
        self.k = nn.Linear(config.proj_dim, inner, bias=False)
        self.v = nn.Linear(config.proj_dim, inner, bias=False)
        self.q_norm = nn.Parameter(torch.ones(config.head_dim))
        self.k_norm = nn.Parameter(torch.ones(config.head_dim))
        # learned bias per head and distance (0 = the token itself): the gate's only sense of order
        self.distance_bias = nn.Parameter(torch.zeros(config.heads, config.window))
        self.out = nn.Linear(inner + config.proj_dim, kv_heads)
        # start with p spread around 0.5 (logits of std ~0.5): about half the tokens kept, flags on either side of
        # tau from the first step, and no layer flipping all its flags at once when the bias moves
        nn.init.normal_(self.out.weight, std=(inner + config.proj_dim) ** -0.5)
        nn.init.zeros_(self.out.bias)

    def forward(self, hidden: torch.Tensor, valid: torch.Tensor | None = None,
                state: GateState | None = None) -> tuple[torch.Tensor, GateState]:
        """Keep probabilities of the new tokens [B, T, kv_heads] and the state to carry to the next forward.

        hidden [B, T, D]: the layer's attention input; valid [B, T]: False for padding; state: what the
        previous forward left (None at the start of a sequence).
        """
        with torch.autocast(hidden.device.type, enabled=False):  # float32 under a model's autocast too
            return self._forward(hidden, valid, state)

    def _forward(self, hidden, valid, state):
        cfg = self.config
        B, T, _ = hidden.shape
        # unit-RMS input: attention inputs differ in scale by an order of magnitude across layers and models
        h = hidden.to(self.proj.weight.dtype)
        x = self.proj(F.rms_norm(h, (h.shape[-1],)))  # [B, T, proj]
        shape = (B, T, cfg.heads, cfg.head_dim)
        q = F.rms_norm(self.q(x).view(shape), (cfg.head_dim,), self.q_norm)
        k = F.rms_norm(self.k(x).view(shape), (cfg.head_dim,), self.k_norm)
        v = self.v(x).view(shape)
        if valid is None:
            valid = torch.ones(B, T, dtype=torch.bool, device=hidden.device)
        if state is not None:
            k_all = torch.cat([state.keys.transpose(1, 2), k], dim=1)
            v_all = torch.cat([state.values.transpose(1, 2), v], dim=1)
            valid_all = torch.cat([state.valid, valid], dim=1)
        else:
            k_all, v_all, valid_all = k, v, valid
        attended = local_attention(q, k_all, v_all, valid_all, self.distance_bias)  # [B, T, heads, head_dim]
        logits = self.out(torch.cat([attended.reshape(B, T, -1), x], dim=-1))
        keep = cfg.window - 1
        new_state = GateState(k_all[:, -keep:].detach().transpose(1, 2), v_all[:, -keep:].detach().transpose(1, 2),
                              valid_all[:, -keep:])
        return torch.sigmoid(logits), new_state


class GateStack:
    """Several layers' gates stepped together, one new token each: a decode step of every gated layer in one set of
    batched operations.

    At one token per forward a gate's cost is the count of its operations, not their size, and inside the model
    each operation runs with cold caches after the layer's large products (~10 us each on CPU); gate by gate, 30
    layers spent more on their gates than on the attention itself. A decoded token's own flag is not needed within
    its forward (its query sees its own key whatever the flag), so the cache defers the gates of a decode step to
    the end of the forward and runs them here, their weights stacked [gates, ...]: the same math as `_forward`
    for one token after a full window (up to float rounding), in ~20 operations for all layers.
    """

    def __init__(self, gates: list[AttentionGate]):
        self.gates = list(gates)
        self.config = self.gates[0].config
        self._version = None

    def _constants(self) -> tuple[torch.Tensor, ...]:
        """Stacked weights, rebuilt whenever a parameter changed (in place too: training):
        the input projection [G, D, proj] and its bias [G, 1, proj]; [q; k; v; read-out of the projected token]
        [G, proj, 3 * inner + kv_heads] and bias [G, 1, ...] (the read-out's); q and k norm weights [G, 1, 2, 1, 1,
        head_dim] (q's with the attention's 1 / sqrt(head_dim)); the distance bias by window slot [G, 1, heads, 1,
        window] (slot s holds distance window - 1 - s); the read-out of the attention output [G, inner, kv_heads]."""
        params = [p for gate in self.gates for p in gate.parameters()]
        version = tuple((p.data_ptr(), p._version) for p in params)
        if version != self._version:
            cfg = self.config
            inner = cfg.heads * cfg.head_dim
            with torch.no_grad():
                g = self.gates
                proj = torch.stack([m.proj.weight.t() for m in g])
                proj_bias = torch.stack([m.proj.bias for m in g]).unsqueeze(1)
                weight = torch.stack([torch.cat([m.q.weight, m.k.weight, m.v.weight, m.out.weight[:, inner:]]).t()
                                      for m in g])
                bias = torch.stack([torch.cat([m.out.bias.new_zeros(3 * inner), m.out.bias]) for m in g]).unsqueeze(1)
                norms = torch.stack([torch.stack([m.q_norm * cfg.head_dim**-0.5, m.k_norm]) for m in g])
                by_slot = torch.stack([m.distance_bias.flip(-1) for m in g]).view(len(g), 1, cfg.heads, 1, cfg.window)
                read_out = torch.stack([m.out.weight[:, :inner].t() for m in g])
            self._cached = tuple(t.contiguous() for t in (proj, proj_bias, weight, bias)) + (
                norms.view(len(g), 1, 2, 1, 1, cfg.head_dim), by_slot.contiguous(), read_out.contiguous())
            self._version = version
        return self._cached

    def step(self, hidden: torch.Tensor, state: GateState, valid: torch.Tensor | None = None
             ) -> tuple[torch.Tensor, GateState]:
        """Keep probabilities [G, B, kv_heads] of one new token per gate, and the stacked state after it.

        hidden [G, B, D]: each gated layer's attention input for the token; state: the gates' states stacked
        (`GateStack.stack`: keys, values [G, B, heads, window - 1, head_dim], valid [B, window - 1], the same for
        every layer); valid [B]: False where the new token is padding (None: none is).
        """
        cfg = self.config
        G, B, D = hidden.shape
        proj, proj_bias, weight, bias, qk_norm, bias_by_slot, read_out = self._constants()
        h = hidden if hidden.dtype == proj.dtype else hidden.to(proj.dtype)
        x = torch.baddbmm(proj_bias, F.rms_norm(h, (D,)), proj)  # [G, B, proj]
        qkv, logits = torch.baddbmm(bias, x, weight).split((weight.shape[-1] - read_out.shape[-1],
                                                            read_out.shape[-1]), -1)
        qkv = qkv.view(G, B, 3, cfg.heads, 1, cfg.head_dim)
        q, k = (F.rms_norm(qkv[:, :, :2], (cfg.head_dim,)) * qk_norm).unbind(2)  # [G, B, heads, 1, head_dim]
        keys = torch.cat([state.keys, k], dim=3)  # [G, B, heads, window, head_dim], oldest first
        values = torch.cat([state.values, qkv[:, :, 2]], dim=3)
        all_valid = state.all_valid
        if all_valid is None:
            all_valid = bool(state.valid.all())
        mask = bias_by_slot
        if valid is None and all_valid:  # no padding in the window
            next_valid = state.valid
        else:
            if valid is None:
                valid = torch.ones(B, dtype=torch.bool, device=hidden.device)
            key_valid = torch.cat([state.valid, valid.view(B, 1)], dim=1)  # [B, window]
            mask = mask.masked_fill(~key_valid.view(1, B, 1, 1, cfg.window), float("-inf"))
            next_valid, all_valid = key_valid[:, 1:], False
        probs = torch.softmax(torch.matmul(q, keys.transpose(-1, -2)) + mask, dim=-1)
        if not all_valid:  # a padding query with only padding in its window sees nothing: 0, as `_forward` gives
            probs = torch.nan_to_num(probs, nan=0.0)
        attended = torch.matmul(probs, values)  # [G, B, heads, 1, head_dim]
        logits = torch.baddbmm(logits, attended.view(G, B, -1), read_out)
        return torch.sigmoid(logits), GateState(keys[:, :, :, 1:], values[:, :, :, 1:], next_valid, all_valid)

    @staticmethod
    def stack(states: list[GateState]) -> GateState:
        """Per-layer states (full windows of the same tokens) -> one stacked state."""
        first = states[0]
        return GateState(torch.stack([s.keys for s in states]), torch.stack([s.values for s in states]), first.valid,
                         first.all_valid)

    @staticmethod
    def unstack(state: GateState) -> list[GateState]:
        return [GateState(k, v, state.valid, state.all_valid) for k, v in zip(state.keys, state.values)]


def local_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_valid: torch.Tensor,
                    distance_bias: torch.Tensor) -> torch.Tensor:
    """Causal attention of the T newest tokens over the `window` most recent keys (distance 0..window-1).

    q [B, T, h, d] are the last T of the keys k, v [B, P + T, h, d]; key_valid [B, P + T]; distance_bias
    [h, window]. Computed block by block (blocks of `window` queries against 2 * window keys), so the cost is
    O(T * window), never O(T^2). Returns [B, T, h, d]; padding queries with nothing to see get 0.
    """
    B, T, h, d = q.shape
    W = distance_bias.shape[1]
    P = k.shape[1] - T
    if T < W:
        # a few new tokens (decoding): all of them against the last T + W - 1 keys, no block padding
        return _band_attention(q, k[:, -(T + W - 1):], v[:, -(T + W - 1):], key_valid[:, -(T + W - 1):],
                               distance_bias)
    blocks = -(-T // W)
    tail = blocks * W - T
    # key index c (0..P+T-1) of query i is P + i. Key-pad W slots in front so every block finds 2W keys:
    # block b's queries sit at padded key slots [b*W + W, b*W + 2W) of the window starting at b*W.
    front = W - P  # may be negative when the buffer holds more than needed
    if front >= 0:
        k = F.pad(k, (0, 0, 0, 0, front, tail))
        v = F.pad(v, (0, 0, 0, 0, front, tail))
        key_valid = F.pad(key_valid, (front, tail), value=False)
    else:
        k = F.pad(k[:, -front:], (0, 0, 0, 0, 0, tail))
        v = F.pad(v[:, -front:], (0, 0, 0, 0, 0, tail))
        key_valid = F.pad(key_valid[:, -front:], (0, tail), value=False)
    q = F.pad(q, (0, 0, 0, 0, 0, tail))
    kb = k.unfold(1, 2 * W, W)  # [B, blocks, h, d, 2W]
    vb = v.unfold(1, 2 * W, W)
    ok = key_valid.unfold(1, 2 * W, W)  # [B, blocks, 2W]
    qb = q.view(B, blocks, W, h, d)
    logits = torch.einsum("bnihd,bnhdj->bnhij", qb, kb) / math.sqrt(d)  # [B, blocks, h, W, 2W]
    i = torch.arange(W, device=q.device).view(W, 1)
    j = torch.arange(2 * W, device=q.device).view(1, 2 * W)
    distance = i + W - j  # query i of a block sits at slot i + W
    in_band = (distance >= 0) & (distance < W)
    bias = distance_bias[:, distance.clamp(0, W - 1)]  # [h, W, 2W]
    allowed = in_band.view(1, 1, 1, W, 2 * W) & ok.view(B, blocks, 1, 1, 2 * W)
    logits = (logits + bias).masked_fill(~allowed, float("-inf"))
    probs = torch.nan_to_num(torch.softmax(logits, dim=-1), nan=0.0)
    out = torch.einsum("bnhij,bnhdj->bnihd", probs, vb)  # [B, blocks, W, h, d]
    return out.reshape(B, blocks * W, h, d)[:, :T]


def _band_attention(q, k, v, key_valid, distance_bias):
    """local_attention for T < window queries, directly against the S <= T + window - 1 keys."""
    B, T, h, d = q.shape
    S, W = k.shape[1], distance_bias.shape[1]
    distance = torch.arange(S - T, S, device=q.device).view(T, 1) - torch.arange(S, device=q.device).view(1, S)
    allowed = (distance >= 0) & (distance < W) & key_valid.view(B, 1, 1, S)
    logits = torch.einsum("bthd,bshd->bhts", q, k) / math.sqrt(d) + distance_bias[:, distance.clamp(0, W - 1)]
    probs = torch.nan_to_num(torch.softmax(logits.masked_fill(~allowed, float("-inf")), dim=-1), nan=0.0)
    return torch.einsum("bhts,bshd->bthd", probs, v)


# ---------------------------------------------------------------------------------------------- model plumbing
def gated_layers(model) -> list[int]:
    """Indices of the layers that get a gate: every full-attention layer (Gemma3's sliding layers are not)."""
    config = config_of(model).get_text_config(decoder=True)
    kinds = getattr(config, "layer_types", None) or ["full_attention"] * config.num_hidden_layers
    return [i for i, kind in enumerate(kinds) if kind != "sliding_attention"]


def build_gates(model, config: GateConfig, seed: int | None = None) -> nn.ModuleDict:
    """Fresh float32 gates for every gated layer of `model` (on its device; or of a config, on the CPU), keyed by
    str(layer index)."""
    text = config_of(model).get_text_config(decoder=True)
    if seed is not None:
        torch.manual_seed(seed)
    gates = nn.ModuleDict({
        str(i): AttentionGate(text.hidden_size, text.num_key_value_heads, config) for i in gated_layers(model)
    })
    return gates.to(next(model.parameters()).device) if isinstance(model, nn.Module) else gates


def gate_parameters(gates: nn.ModuleDict) -> int:
    return sum(p.numel() for p in gates.parameters())


def save_attention_gates(directory, model, gates: nn.ModuleDict, config: GateConfig, training: dict | None = None):
    """gates.safetensors + gates.json (model identity, hyper-parameters, training record) in `directory`."""
    from .checkpoint import save_gates

    return save_gates(directory, KIND, model, {int(i): g for i, g in gates.items()}, config.to_dict(), training)


def load_attention_gates(directory, model) -> tuple[GateConfig, nn.ModuleDict, dict]:
    """(config, gates, meta) of a checkpoint; ValueError if it was made for another model."""
    from .checkpoint import read_gates

    meta, gates = read_gates(directory, KIND, model,
                             lambda meta: build_gates(model, GateConfig.from_dict(meta["hyper"])))
    config = GateConfig.from_dict(meta["hyper"])
    for p in gates.parameters():
        p.requires_grad_(False)
    return config, gates.eval(), meta


DEFAULT_TARGET = 0.5  # the target ratio of the gates shipped in `checkpoints/attention-gate/<model>/`


def shipped_targets(model_name: str) -> dict[float, Path]:
    """{target ratio: folder} of the Attention-Gate checkpoints shipped for `model_name`: `<model>/` (trained for
    DEFAULT_TARGET) and `<model>-t<ratio>/` for other targets, each ratio read from its gates.json."""
    from .checkpoint import SHIPPED

    found = {}
    for folder in sorted((SHIPPED / KIND).glob(f"{model_name}*")):
        if folder.name != model_name and not folder.name.startswith(f"{model_name}-t"):
            continue
        try:
            meta = json.loads((folder / "gates.json").read_text())
        except (OSError, ValueError):
            continue  # not a checkpoint (read_gates names what is wrong with a damaged one when it is used)
        found[float(meta["hyper"]["target_ratio"])] = folder
    return found


def resolve_gates_dir(gates: str | Path | None, model, target: float | None = None) -> Path:
    """The checkpoint folder: `gates` if given, else the gates shipped for the model's name that were trained for
    `target` (None: DEFAULT_TARGET's). FileNotFoundError naming the shipped targets when there are none for it."""
    if gates is not None:
        return Path(gates)
    from .checkpoint import shipped_gates

    name = getattr(config_of(model), "name_or_path", "") or ""
    if target is None:
        return shipped_gates(KIND, name)
    shipped = shipped_targets(name)
    for ratio, folder in shipped.items():
        if abs(ratio - target) < 1e-6:
            return folder
    targets = ", ".join(f"{r:g}" for r in sorted(shipped)) or "none"
    raise FileNotFoundError(f"no {KIND} gates trained for target={target:g} are shipped for {name!r} (shipped "
                            f"targets: {targets}); train some with `kvevict train {KIND} --model {name} "
                            f"--target-ratio {target:g} --out DIR` and pass gates=DIR")


def checkpoint_target(folder: str | Path) -> float | None:
    """The target ratio recorded in a checkpoint folder's gates.json (None if it cannot be read)."""
    try:
        return float(json.loads((Path(folder) / "gates.json").read_text())["hyper"]["target_ratio"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def hard_flags(prob: torch.Tensor, tau: float) -> torch.Tensor:
    """1.0 where p >= tau (keep), else 0.0."""
    return (prob >= tau).to(prob.dtype)


def sink_mask(length: int, sink_tokens: int, device, offset: int = 0) -> torch.Tensor:
    """[length] bool, True for positions offset..offset+length-1 among the first `sink_tokens` of the sequence."""
    return torch.arange(offset, offset + length, device=device) < sink_tokens


# ---------------------------------------------------------------------------------------------- flagged forward
@dataclass
class FlagRecord:
    """What a flagged forward produced in one gated layer."""

    prob: torch.Tensor  # [B, T, H] keep probabilities
    flags: torch.Tensor  # [B, T, H] STE flags (value: hard 0/1; gradient: d/dp); 1 on sink tokens
    evictable: torch.Tensor  # [T] bool, False on sink tokens
    recent: int = 1  # each query sees its `recent` newest keys whatever their flags (GateConfig.recent_window)


_FLAGS: contextvars.ContextVar[dict | None] = contextvars.ContextVar("kvevict_gate_flags", default=None)


@contextmanager
def flagged_forward(model, gates: nn.ModuleDict, config: GateConfig, straight_through: bool = True):
    """Within this block, a plain forward of `model` (no cache, no padding) evicts in-context by the gates' flags.

    Yields a dict {layer: FlagRecord} filled during the forward. The model's attention goes through
    `flagged_attention` (registered as TRAINING_ATTENTION) for the duration of the block. With
    `straight_through`, flags carry the STE gradient to the gates; otherwise they are constant hard flags.
    """
    from ..hooks import attention_modules, hidden_states_of

    register_training_attention()
    records: dict[int, FlagRecord] = {}

    def gate_hook(module, args, kwargs):
        hidden = hidden_states_of(args, kwargs)
        key = str(module.layer_idx)
        if key not in gates:
            return
        # detached input: a gate learns from the effect of its own flags, not through the flags of earlier layers
        prob, _ = gates[key](hidden.detach())
        hard = hard_flags(prob.detach(), config.tau)
        flags = hard + prob - prob.detach() if straight_through else hard
        evictable = ~sink_mask(hidden.shape[1], config.sink_tokens, hidden.device)
        flags = torch.where(evictable.view(1, -1, 1), flags, torch.ones_like(flags))
        records[module.layer_idx] = FlagRecord(prob, flags, evictable, config.recent_window)

    handles = [m.register_forward_pre_hook(gate_hook, with_kwargs=True) for m in attention_modules(model)]
    token = _FLAGS.set(records)
    try:
        with attention_implementation(model, TRAINING_ATTENTION):
            yield records
    finally:
        _FLAGS.reset(token)
        for h in handles:
            h.remove()


def flagged_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """Causal attention where each key j < i counts with weight flags[j] (its own position with weight 1; with a
    record's `recent` > 1, every key j > i - recent).

    The value is exactly attention with the flagged keys masked (hard 0/1 flags); with straight-through flags the
    gradient reaches the gate through a bounded estimate of each flag's effect (see `_FlaggedAttention.backward`).
    Ignores `attention_mask`: flagged forwards run without padding. Sliding layers keep their window. Runs SDPA's
    fused kernel with a boolean mask (float32 inside, whatever the autocast); `flagged_attention_eager` is the same
    math written out, used for logit soft-capping (which SDPA lacks) and as the reference in the tests.
    """
    if kwargs.get("softcap") is not None:
        return flagged_attention_eager(module, query, key, value, attention_mask, scaling, dropout, **kwargs)
    records = _FLAGS.get()
    B, Hq, T, d = query.shape
    H = key.shape[1]
    if key.shape[2] != T:
        raise ValueError("flagged_attention runs a whole sequence at once (no cache): keys and queries must match")
    scaling = d**-0.5 if scaling is None else scaling
    window = kwargs.get("sliding_window") or getattr(module, "sliding_window", None)
    record = None if records is None else records.get(module.layer_idx)
    flags = None if record is None else record.flags.permute(0, 2, 1)  # [B, H, S]: value 0/1, gradient d/dp
    recent = 1 if record is None else record.recent
    with torch.autocast(query.device.type, enabled=False):
        # query heads of a KV group side by side: [B, H, G, T, d] against [B, H, S, d]
        q = query.float().reshape(B, H, Hq // H, T, d)
        out = _FlaggedAttention.apply(q, key.float(), value.float(), flags, window, scaling, recent)
    return out.to(query.dtype).reshape(B, Hq, T, d).transpose(1, 2).contiguous(), None


def _allowed(rows: range, cols: range, window: int | None, device) -> torch.Tensor:
    """[len(rows), len(cols)] bool: query position i may see key position j (causal, within `window` if any)."""
    i = torch.arange(rows.start, rows.stop, device=device).view(-1, 1)
    j = torch.arange(cols.start, cols.stop, device=device).view(1, -1)
    allowed = i >= j
    if window:
        allowed &= i - j < window
    return allowed


def _unflagged(rows: range, cols: range, recent: int, device) -> torch.Tensor:
    """[len(rows), len(cols)] bool: key j is among query i's `recent` newest positions (its own when recent = 1),
    seen whatever its flag."""
    i = torch.arange(rows.start, rows.stop, device=device).view(-1, 1)
    distance = i - torch.arange(cols.start, cols.stop, device=device).view(1, -1)
    return (distance >= 0) & (distance < recent)


def _visible(rows: range, cols: range, window: int | None, flags: torch.Tensor | None, device,
             recent: int = 1) -> torch.Tensor:
    """[B or 1, H or 1, 1, len(rows), len(cols)] bool: allowed, and kept (flag 1) or among the query's `recent`
    newest positions."""
    allowed = _allowed(rows, cols, window, device)
    if flags is None:
        return allowed.view(1, 1, 1, *allowed.shape)
    kept = flags[..., cols.start : cols.stop].detach() > 0.5  # [B, H, len(cols)]
    return (allowed & (_unflagged(rows, cols, recent, device) | kept.unsqueeze(2))).unsqueeze(2)


class _FlaggedAttention(torch.autograd.Function):
    """Masked attention by a fused kernel forward (on CPU `flagged_prefill`, elsewhere SDPA with a mask); a
    hand-written backward adds the straight-through gradient of the flags.

    q [B, H, G, T, d] (the G query heads of each KV head), k, v [B, H, T, d], flags [B, H, T] or None, all float32;
    each query sees its `recent` newest keys whatever their flags; returns [B, H, G, T, d]. Nothing of size T x T
    is kept for the backward, which recomputes the logits block by block of query rows, each block against the keys
    it may see only (causal: about half of T x T).
    """

    # Query rows per block of the backward. Fewer rows make small, slow products; more make the dozen elementwise
    # passes leave the CPU's cache. 64 was fastest from 256 to 2,048 tokens (smollm2's shape, batch 1 and 4).
    ROWS_PER_BLOCK = 64

    @staticmethod
    def forward(ctx, q, k, v, flags, window, scaling, recent=1):
        B, H, G, T, d = q.shape
        lse = None
        if flags is not None and window is None and recent == 1 and FUSED_CPU and q.device.type == "cpu":
            # one fused causal pass with the hidden keys as a bias over the keys, no [T, T] mask per head
            out, lse = flagged_prefill(q.view(B, H * G, T, d), k, v, flags.detach() > 0.5, scaling, with_lse=True)
            out, lse = out.transpose(1, 2).reshape(B, H, G, T, d), lse.view(B, H, G, T, 1)
        else:
            mask = _visible(range(T), range(T), window, flags, q.device, recent).expand(B, H, G, T, T)
            out = F.scaled_dot_product_attention(q.reshape(B, H, G * T, d), k, v, scale=scaling,
                                                 attn_mask=mask.reshape(B, H, G * T, T))
            out = out.view(B, H, G, T, d)
        ctx.save_for_backward(q, k, v, out, flags, lse)
        ctx.window, ctx.scaling, ctx.recent = window, scaling, recent
        return out

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, out, flags, lse = ctx.saved_tensors
        window, scaling, recent = ctx.window, ctx.scaling, ctx.recent
        B, H, G, T, d = q.shape
        want_flags = flags is not None and ctx.needs_input_grad[3]
        grad_q = torch.zeros_like(q)
        grad_k, grad_v = torch.zeros_like(k), torch.zeros_like(v)
        grad_flags = torch.zeros_like(flags) if want_flags else None
        kept = None if flags is None else (flags.detach() > 0.5).to(q.dtype)[:, :, None, None]  # [B, H, 1, 1, T]
        # dL/dp_ij = g_i . v_j - g_i . out_i: the second term (the softmax's own) per query
        own_term = (grad_out * out).sum(-1, keepdim=True)  # [B, H, G, T, 1]
        # Masks are 0/1 floats applied by products, [n, m] or [B, H, 1, n, m]: G times smaller than the logits
        for start in range(0, T, _FlaggedAttention.ROWS_PER_BLOCK):
            rows = range(start, min(T, start + _FlaggedAttention.ROWS_PER_BLOCK))
            cols = range(max(0, start - window + 1) if window else 0, rows.stop)  # the keys these rows may see
            n = len(rows)
            qb = q[:, :, :, rows.start : rows.stop]  # [B, H, G, n, d]
            kb, vb = k[:, :, None, cols.start : cols.stop], v[:, :, None, cols.start : cols.stop]  # [B, H, 1, m, d]
            gb = grad_out[:, :, :, rows.start : rows.stop]
            allowed = _allowed(rows, cols, window, q.device)
            own = _unflagged(rows, cols, recent, q.device) & allowed  # seen whatever the flag
            flaggable = (allowed & ~own).to(q.dtype)
            if kept is None:
                visible, hidden = allowed.to(q.dtype), None
            else:
                kept_b = kept[..., cols.start : cols.stop]
                visible = torch.addcmul(own.to(q.dtype), flaggable, kept_b)  # [B, H, 1, n, m]
                hidden = flaggable * (1.0 - kept_b)
            shifted = torch.matmul(qb * scaling, kb.transpose(-1, -2))  # logits s_ij, then s_ij - lse_i
            if lse is None:
                shifted -= torch.logsumexp(shifted.masked_fill(visible == 0, float("-inf")), dim=-1, keepdim=True)
            else:
                shifted -= lse[:, :, :, rows.start : rows.stop]
            # a visible key's s_ij - lse_i is <= 0; the clamp keeps a masked one's exp finite (never inf * 0)
            probs = shifted.clamp_max(0.0).exp_().mul_(visible)
            grad_probs = torch.matmul(gb, vb.transpose(-1, -2)).sub_(own_term[:, :, :, rows.start : rows.stop])
            grad_logits = probs * grad_probs
            grad_q[:, :, :, rows.start : rows.stop] = torch.matmul(grad_logits, kb).mul_(scaling)
            # key gradients summed over the G query heads of each KV head: fold G into the rows
            folded = (B, H, G * n, len(cols))
            grad_k[:, :, cols.start : cols.stop] += torch.matmul(
                grad_logits.reshape(folded).transpose(-1, -2), qb.reshape(B, H, G * n, d)).mul_(scaling)
            grad_v[:, :, cols.start : cols.stop] += torch.matmul(
                probs.reshape(folded).transpose(-1, -2), gb.reshape(B, H, G * n, d))
            if want_flags:
                # Straight-through gradient, made finite: d out_i / d m_j = q_ij (v_j - out_i), where q_ij is the
                # weight key j has among the visible keys plus itself. For a kept key that is the exact derivative
                # (q = its probability: grad_logits); for a hidden key it is the exact effect of revealing it
                # (q = sigmoid(s_ij - lse_i)), where the plain derivative of exp(s) * m / sum(exp(s) * m) at m = 0
                # grows as exp(s_ij - max visible) and made training diverge. A query's own key (its `recent`
                # newest) carries no gradient: its flag does not act there.
                per_pair = torch.sigmoid_(shifted).mul_(hidden).mul_(grad_probs).addcmul_(grad_logits, flaggable)
                grad_flags[..., cols.start : cols.stop] += per_pair.sum(dim=(2, 3))
        return grad_q, grad_k, grad_v, grad_flags, None, None, None


def flagged_attention_eager(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """`flagged_attention` written out with materialised [T, S] attention (same value and gradients)."""
    records = _FLAGS.get()
    B, Hq, T, d = query.shape
    H = key.shape[1]
    G = Hq // H
    if key.shape[2] != T:
        raise ValueError("flagged_attention runs a whole sequence at once (no cache): keys and queries must match")
    scaling = d**-0.5 if scaling is None else scaling
    q = query.float().reshape(B, H, G, T, d)
    logits = torch.einsum("bhgtd,bhsd->bhgts", q, key.float()) * scaling  # [B, H, G, T, S]
    softcap = kwargs.get("softcap")
    if softcap is not None:
        logits = torch.tanh(logits / softcap) * softcap
    allowed = _allowed(range(T), range(T), kwargs.get("sliding_window") or getattr(module, "sliding_window", None),
                       query.device)
    logits = logits.masked_fill(~allowed, float("-inf"))
    record = None if records is None else records.get(module.layer_idx)
    v = value.float()
    if record is None:
        out = torch.einsum("bhgts,bhsd->bhgtd", torch.softmax(logits, dim=-1), v)
        return out.to(query.dtype).reshape(B, Hq, T, d).transpose(1, 2).contiguous(), None
    flags = record.flags.float().permute(0, 2, 1)  # [B, H, S]: value 0/1, gradient d/dp
    hard = flags.detach() > 0.5
    own = _unflagged(range(T), range(T), record.recent, query.device)  # own position (and the recent ones)
    visible = (own | hard.unsqueeze(2)).unsqueeze(2)  # [B, H, 1, T, S]: own position always seen
    masked = logits.masked_fill(~visible, float("-inf"))
    probs = torch.softmax(masked, dim=-1)
    out = torch.einsum("bhgts,bhsd->bhgtd", probs, v)  # exactly attention with the flagged keys masked
    delta = (flags - flags.detach()).unsqueeze(2).unsqueeze(3)  # [B, H, 1, 1, S]: value 0, carries d/dp
    if delta.requires_grad:
        # the straight-through term of _FlaggedAttention.backward, as a value-0 addition autograd differentiates
        with torch.no_grad():
            lse = torch.logsumexp(masked, dim=-1, keepdim=True)
            q = torch.where(visible, probs, torch.sigmoid(logits - lse)).masked_fill(own, 0.0)
            q = q.masked_fill(~allowed, 0.0)
        weight = q * delta  # [B, H, G, T, S], value 0
        out = out + torch.einsum("bhgts,bhsd->bhgtd", weight, v.detach()) - weight.sum(-1, keepdim=True) * out.detach()
    return out.to(query.dtype).reshape(B, Hq, T, d).transpose(1, 2).contiguous(), None


_registered = False


def register_training_attention() -> None:
    """Register `flagged_attention` with transformers' AttentionInterface (idempotent).

    No mask function is registered for it, so transformers builds no mask (the function is causal by itself).
    """
    global _registered
    if _registered:
        return
    from transformers import AttentionInterface

    AttentionInterface.register(TRAINING_ATTENTION, flagged_attention)
    _registered = True
