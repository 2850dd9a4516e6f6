"""Fast KVzip's gate (Kim, Han, Yun, "Fast KVzip", arXiv 2601.17668): low-rank attention against learned sinks.

For the hidden state h entering an attention layer (after its input norm), per KV head h and query head g of its
group:
    q = RMSNorm(W_q h + b_q) -> [H, G, d_g]      k = RMSNorm(W_k h) -> [H, d_g]    (no RoPE, one token at a time)
    l_self = q.k / sqrt(d_g) + bias[h, g]          l_s = q.K_sink[h, s] / sqrt(d_g)   (S learned sink keys)
    score = exp(l_self) / (exp(l_self) + sum_s exp(l_s)),  averaged over g  ->  (0, 1) per KV head
The sink keys and the bias start at zero; the RMSNorm weight is shared by the heads.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ..models import config_of


class HeadRMSNorm(nn.Module):
    """RMSNorm over the last dim with one weight vector shared by every head."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


class SinkGate(nn.Module):
    """Per-token keep score for every KV head of one attention layer."""

    def __init__(self, hidden_size: int, kv_heads: int, group_size: int, gate_dim: int = 16, sinks: int = 16):
        super().__init__()
        self.kv_heads, self.group_size, self.gate_dim, self.sinks = kv_heads, group_size, gate_dim, sinks
        self.q_proj = nn.Linear(hidden_size, kv_heads * group_size * gate_dim, bias=True)
        self.k_proj = nn.Linear(hidden_size, kv_heads * gate_dim, bias=False)
        self.q_norm = HeadRMSNorm(gate_dim)
        self.k_norm = HeadRMSNorm(gate_dim)
        self.sink_keys = nn.Parameter(torch.zeros(kv_heads, sinks, gate_dim))
        self.bias = nn.Parameter(torch.zeros(kv_heads, group_size))

    def logits(self, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(l_self [..., H, G], log-sum-exp of the sink logits [..., H, G])."""
        H, G, d = self.kv_heads, self.group_size, self.gate_dim
        q = self.q_norm(self.q_proj(hidden).view(*hidden.shape[:-1], H, G, d))
        k = self.k_norm(self.k_proj(hidden).view(*hidden.shape[:-1], H, d))
        scale = 1.0 / math.sqrt(d)
        l_self = (q * k.unsqueeze(-2)).sum(-1) * scale + self.bias
        l_sink = torch.einsum("...hgd,hsd->...hgs", q, self.sink_keys) * scale
        return l_self, torch.logsumexp(l_sink, dim=-1)

    def forward(self, hidden: torch.Tensor, model_precision: bool = False) -> torch.Tensor:
        """Keep scores in (0, 1): [..., kv_heads] for hidden [..., hidden_size]. `model_precision` (inference
        only): the input projection runs in the hidden states' own 16-bit dtype, the rest in float32."""
        if not torch.is_grad_enabled():
            return self._scores(hidden, model_precision)
        l_self, l_sinks = self.logits(hidden)
        # exp(a) / (exp(a) + sum_s exp(b_s)) = sigmoid(a - logsumexp(b))
        return torch.sigmoid(l_self - l_sinks).mean(-1)

    def _folded(self, dtype: torch.dtype = torch.float32) -> tuple:
        """The parameters rearranged for `_scores`, rebuilt whenever a parameter changes; the projection's weight
        and bias in `dtype`."""
        key = tuple((p.data_ptr(), p._version) for p in self.parameters())
        if getattr(self, "_folded_key", None) != key:
            self._folded_key, self._folded_by_dtype = key, {}
        if dtype not in self._folded_by_dtype:
            H, G, d = self.kv_heads, self.group_size, self.gate_dim
            with torch.no_grad():
                weight = torch.cat([self.q_proj.weight, self.k_proj.weight])  # one projection for q and k
                bias = torch.cat([self.q_proj.bias, self.q_proj.bias.new_zeros(H * d)]).unsqueeze(-1)
                # RMSNorm's weights folded in: q.k picks up w_q * w_k, the sink logits w_q * K_sink
                pair_weight = (self.q_norm.weight * self.k_norm.weight).view(1, 1, d, 1)
                sinks = self.sink_keys * self.q_norm.weight  # [H, S, d]
                # |sink logit| <= |normalised q| |w_q * K_sink| / sqrt(d) <= max |w_q * K_sink|: exp cannot overflow
                plain_exp = float(sinks.norm(dim=-1).max()) < 60.0
                sinks = sinks.repeat_interleave(G, dim=0)  # [H * G, S, d]: one block per query head
            self._folded_by_dtype[dtype] = (weight.to(dtype).contiguous(), bias.to(dtype), pair_weight, sinks,
                                            plain_exp)
        return self._folded_by_dtype[dtype]

    def _scores(self, hidden: torch.Tensor, model_precision: bool = False) -> torch.Tensor:
        """`forward` without autograd, in fewer tensor operations. The projection is computed transposed, tokens
        last ([q heads + k heads, d, N]): every later operation runs along contiguous rows of N tokens and the
        sink logits are one batched product per query head. q and k come from one matrix product; the RMSNorms
        enter as per-token factors (q_norm(q).k_norm(k) = rq rk sum(q w_q w_k k)). Equal to the reference up to
        float32 rounding; with `model_precision` and 16-bit hidden states the projection is rounded to that
        dtype (on CPUs with AMX-BF16 it then runs ~3x faster)."""
        H, G, d = self.kv_heads, self.group_size, self.gate_dim
        low = model_precision and hidden.dtype in (torch.bfloat16, torch.float16)
        weight, bias, pair_weight, sinks, plain_exp = self._folded(hidden.dtype if low else torch.float32)
        lead = hidden.shape[:-1]
        flat = hidden.reshape(-1, hidden.shape[-1])
        y = torch.addmm(bias, weight, flat.t()).float() if low else torch.addmm(bias, weight, flat.float().t())
        N, scale = y.shape[1], 1.0 / math.sqrt(d)
        y = y.view(H * G + H, d, N)  # q's heads, then k's
        q, k = y[:H * G], y[H * G:]
        mean_square = y.pow(2).mean(1)  # [H * G + H, N]
        rq = torch.rsqrt(mean_square[:H * G] + self.q_norm.eps)  # [H * G, N]
        rk = torch.rsqrt(mean_square[H * G:] + self.k_norm.eps)  # [H, N]
        l_self = (q.view(H, G, d, N) * (k.unsqueeze(1) * pair_weight)).sum(2).view(H * G, N)
        l_self = l_self.mul_(rq).mul_((rk * scale).repeat_interleave(G, dim=0)).add_(self.bias.view(H * G, 1))
        l_sink = torch.bmm(sinks, q).mul_((rq * scale).unsqueeze(1))  # [H * G, S, N]
        lse = l_sink.exp_().sum(1).log_() if plain_exp else torch.logsumexp(l_sink, 1)
        keep = torch.sigmoid(l_self.sub_(lse)).view(H, G, N).mean(1)  # [H, N]
        return keep.t().reshape(*lead, H)


class SinkGateStack:
    """Several layers' gates scoring one decoded token each, in one set of batched operations.

    At one token per forward a gate's cost is the count of its operations (each runs with cold caches after the
    layer's large products), so a decode step scores every gated layer's token at the end of the forward with the
    gates' arranged weights (`SinkGate._folded`) stacked: `SinkGate._scores` with a leading layer dimension.
    """

    def __init__(self, gates: list[SinkGate]):
        self.gates = list(gates)
        self._key = None

    def _stacked(self, dtype: torch.dtype) -> tuple:
        key = (dtype,) + tuple((p.data_ptr(), p._version) for gate in self.gates for p in gate.parameters())
        if key != self._key:
            folded = [gate._folded(dtype) for gate in self.gates]
            with torch.no_grad():
                weight, bias, pair_weight, sinks = (torch.stack([f[i] for f in folded]) for i in range(4))
                self_bias = torch.stack([gate.bias.reshape(-1, 1) for gate in self.gates])  # [L, H * G, 1]
            first = self.gates[0]
            eps = torch.tensor([[first.q_norm.eps], [first.k_norm.eps]]).repeat_interleave(
                torch.tensor([first.kv_heads * first.group_size, first.kv_heads]), dim=0)
            self._cached = (weight, bias, pair_weight, sinks, self_bias, all(f[4] for f in folded),
                            eps.view(1, -1, 1).to(weight.device))
            self._key = key
        return self._cached

    def scores(self, hidden: torch.Tensor, model_precision: bool = False) -> torch.Tensor:
        """Keep scores [L, N, kv_heads] of hidden [L, N, hidden_size] (N tokens for each of the L gates); the same
        math as each gate's `_scores` up to float rounding."""
        first = self.gates[0]
        H, G, d = first.kv_heads, first.group_size, first.gate_dim
        L, N, _ = hidden.shape
        low = model_precision and hidden.dtype in (torch.bfloat16, torch.float16)
        weight, bias, pair_weight, sinks, self_bias, plain_exp, eps = self._stacked(
            hidden.dtype if low else torch.float32)
        x = hidden.transpose(1, 2) if low else hidden.float().transpose(1, 2)  # [L, D, N]
        y = torch.baddbmm(bias, weight, x).float().view(L, H * G + H, d, N)  # q's heads, then k's
        scale = 1.0 / math.sqrt(d)
        r = torch.rsqrt(y.pow(2).mean(2) + eps)  # [L, H * G + H, N]
        rq, rk = r[:, :H * G], r[:, H * G:]
        q, k = y[:, :H * G], y[:, H * G:]
        l_self = (q.view(L, H, G, d, N) * (k.unsqueeze(2) * pair_weight)).sum(3).view(L, H * G, N)
        l_self = l_self * rq * (rk * scale).repeat_interleave(G, dim=1) + self_bias
        l_sink = torch.matmul(sinks, q) * (rq * scale).unsqueeze(2)  # [L, H * G, S, N]
        lse = l_sink.exp().sum(2).log() if plain_exp else torch.logsumexp(l_sink, 2)
        keep = torch.sigmoid(l_self - lse).view(L, H, G, N).mean(2)  # [L, H, N]
        return keep.transpose(1, 2)


def gate_hyper(model, gate_dim: int = 16, sinks: int = 16) -> dict:
    """The shape parameters of the gates for `model` (or its config)."""
    config = config_of(model).get_text_config(decoder=True)
    return {"hidden_size": config.hidden_size, "kv_heads": config.num_key_value_heads,
            "group_size": config.num_attention_heads // config.num_key_value_heads, "gate_dim": gate_dim,
            "sinks": sinks}


def gated_layers(model) -> list[int]:
    """Attention layers that get a gate: every layer, or the global (full-attention) ones of hybrid models."""
    config = config_of(model).get_text_config(decoder=True)
    types = getattr(config, "layer_types", None) or ["full_attention"] * config.num_hidden_layers
    return [i for i, kind in enumerate(types) if kind != "sliding_attention"]


def build_gates(hyper: dict, layers: list[int]) -> nn.ModuleDict:
    return nn.ModuleDict({str(i): SinkGate(hyper["hidden_size"], hyper["kv_heads"], hyper["group_size"],
                                           hyper["gate_dim"], hyper["sinks"]) for i in layers})


def load_gates(folder, model) -> tuple[dict, nn.ModuleDict]:
    """(meta, gates in float32, eval mode) of a Fast KVzip checkpoint, refused if it was made for another model."""
    from .checkpoint import read_gates

    def build(meta: dict) -> nn.ModuleDict:
        # the model gives the attention shape; the checkpoint only the gate's own size
        hyper = meta["hyper"]
        for name in ("gate_dim", "sinks"):
            if type(hyper[name]) is not int or hyper[name] < 1:
                raise ValueError(f"{name} must be a positive integer, got {hyper[name]!r}")
        return build_gates(gate_hyper(model, hyper["gate_dim"], hyper["sinks"]), gated_layers(model))

    meta, gates = read_gates(folder, "fastkvzip", model, build)
    gates = gates.float().eval()
    for gate in gates.values():  # the inference arrangement of the weights, made once with the load
        gate._folded()
    return meta, gates
