"""The seeds' overheads on a GPU: a 1B-class random-weight model (Llama-3.2-1B's shape) at 16k tokens.

The rows of `kvevict bench --compare` and the Attention-Gate decode, each timed as a whole prefill or decode step
with the policy against the plain one in the same process, synchronised, alternated, best of `--repeats`:
- fastgen: a prefill that profiles every prompt row / a plain prefill;
- kvzip: a prefill with the repeat passes and scoring / a plain prefill;
- fastkvzip: a prefill with the gates scoring every layer's tokens / a plain prefill;
- decode: tokens/s with SnapKV at 0.75 and `head` / `global` allocation / `uniform`;
- attention-gate: decode ms/token with the gates / the full cache's.
The weights are random, so the text is too (seeded printable characters through the byte-level test tokenizer,
which has special and punctuation tokens for FastGen and a chat template for KVzip), and so are the gates: what
is measured is their cost, not their choices. "plain" is an EvictingCache with the `full` policy.

    python benchmarks/gpu_overheads.py --device cuda --out gpu_overheads.json     # ~1-3 minutes on an H200
    python benchmarks/gpu_overheads.py --device cpu --tiny --context 256 --out /tmp/o.json   # the same, small
"""

from __future__ import annotations

import argparse
import json
import random
import string
import tempfile
import time
from pathlib import Path

import torch

import kvevict
from kvevict.compat import cache_kwargs
from kvevict.models import tiny_config, tiny_tokenizer

LLAMA32_1B_SHAPE = dict(
    vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
    num_key_value_heads=8, head_dim=64, max_position_embeddings=131072, rope_theta=500000.0,
    tie_word_embeddings=True,
)


def random_model(tiny: bool, dtype: torch.dtype, device: str):
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = tiny_config("llama") if tiny else LlamaConfig(**LLAMA32_1B_SHAPE)
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    return model.eval()


def random_prompt(tok, tokens: int, device: str) -> torch.Tensor:
    rng = random.Random(0)
    alphabet = string.ascii_letters + " " * 12 + ".,;:!?\n"
    ids = tok("".join(rng.choice(alphabet) for _ in range(tokens + 16)), add_special_tokens=False).input_ids
    return torch.tensor([ids[:tokens]], device=device)


def random_gate_folders(model, folder: Path) -> dict[str, str]:
    """Random Fast KVzip and Attention-Gate checkpoints for `model` (sink keys and output weights drawn so that
    scores vary from token to token)."""
    from kvevict.gates import attention_gate, sink_gate
    from kvevict.gates.checkpoint import save_gates

    torch.manual_seed(0)
    layers = sink_gate.gated_layers(model)
    hyper = {**sink_gate.gate_hyper(model), "target_ratio": 0.7}
    gates = sink_gate.build_gates(hyper, layers)
    with torch.no_grad():
        for gate in gates.values():
            gate.sink_keys.normal_()
    save_gates(folder / "fastkvzip", "fastkvzip", model, {i: gates[str(i)] for i in layers}, hyper)
    config = attention_gate.GateConfig(target_ratio=0.5)
    ag = attention_gate.build_gates(model, config)
    with torch.no_grad():
        for gate in ag.values():
            gate.out.weight.normal_(0.0, 1.0)
    attention_gate.save_attention_gates(folder / "attention-gate", model, ag.cpu(), config)
    return {"fastkvzip": str(folder / "fastkvzip"), "attention-gate": str(folder / "attention-gate")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--context", type=int, default=16384)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--decode-tokens", type=int, default=64)
    parser.add_argument("--tiny", action="store_true", help="a tiny random model instead of the 1B shape (CPU check)")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    for name, least in (("context", 2), ("repeats", 1), ("decode_tokens", 1)):
        if getattr(args, name) < least:
            parser.error(f"--{name.replace('_', '-')} must be >= {least}")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error(f"--device {args.device}: no CUDA device here")
    device, cuda = args.device, args.device.startswith("cuda")
    model = random_model(args.tiny, getattr(torch, args.dtype), device)
    tok = tiny_tokenizer()
    ids = random_prompt(tok, args.context, device)
    folders = random_gate_folders(model, Path(tempfile.mkdtemp()))

    def sync():
        if cuda:
            torch.cuda.synchronize()

    def prefill(policy) -> tuple[float, kvevict.EvictingCache, torch.Tensor]:
        cache = kvevict.EvictingCache(model, policy, tokenizer=tok)
        sync()
        started = time.perf_counter()
        with torch.no_grad():
            out = model(input_ids=ids, **cache_kwargs(cache), logits_to_keep=1)
        sync()
        return time.perf_counter() - started, cache, out.logits[:, -1:].argmax(-1)

    def decode(cache, token, steps: int) -> float:
        """Seconds per token over `steps` greedy steps (after 2 warm-up steps)."""
        total = 0.0
        with torch.no_grad():
            for step in range(steps + 2):
                sync()
                started = time.perf_counter()
                token = model(input_ids=token, **cache_kwargs(cache)).logits[:, -1:].argmax(-1)
                sync()
                total += (time.perf_counter() - started) if step >= 2 else 0.0
        return total / steps

    full = kvevict.make_policy("full")
    prefill_rows = {
        "fastgen": kvevict.make_policy("fastgen", tokenizer=tok),
        "kvzip": kvevict.make_policy("kvzip", compression_ratio=0.7, tokenizer=tok),
        "fastkvzip": kvevict.make_policy("fastkvzip", gates=folders["fastkvzip"], compression_ratio=0.7),
    }
    prefill(full)  # warm-up (kernels, allocator)
    rows = []
    for name, policy in prefill_rows.items():
        pairs = [(prefill(full)[0], prefill(policy)[0]) for _ in range(args.repeats)]
        plain_s, policy_s = min(p for p, _ in pairs), min(o for _, o in pairs)
        rows.append({"row": name, "what": "prefill with the policy / plain prefill", "plain_s": plain_s,
                     "policy_s": policy_s, "ratio": policy_s / plain_s, "overhead": policy_s / plain_s - 1})
        print(f"{name}: {policy_s / plain_s:.3f}x the plain prefill ({policy_s:.3f} s / {plain_s:.3f} s)", flush=True)
    per_token = {}
    for name, policy in {"uniform": kvevict.make_policy("snapkv", compression_ratio=0.75),
                         "head": kvevict.make_policy("snapkv", compression_ratio=0.75, allocation="head"),
                         "global": kvevict.make_policy("snapkv", compression_ratio=0.75, allocation="global"),
                         "full": full,
                         "attention-gate": kvevict.make_policy("attention-gate", gates=folders["attention-gate"])}.items():
        _, cache, token = prefill(policy)
        per_token[name] = min(decode(cache, token, args.decode_tokens) for _ in range(args.repeats))
    for name in ("head", "global"):
        ratio = per_token["uniform"] / per_token[name]
        rows.append({"row": "decode", "what": f"tok/s with {name} allocation / uniform (SnapKV 0.75)",
                     "tok_per_s": {name: 1 / per_token[name], "uniform": 1 / per_token["uniform"]}, "ratio": ratio})
        print(f"decode: {name} / uniform tok/s {ratio:.3f}x", flush=True)
    ratio = per_token["attention-gate"] / per_token["full"]
    rows.append({"row": "attention-gate", "what": "decode ms/token with the gates / full cache",
                 "ms_per_token": {"attention-gate": 1e3 * per_token["attention-gate"], "full": 1e3 * per_token["full"]},
                 "ratio": ratio})
    print(f"attention-gate decode: {ratio:.3f}x the full cache's ms/token", flush=True)
    machine = {"torch": torch.__version__, "device": torch.cuda.get_device_name() if cuda else "cpu"}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"model": "tiny-llama" if args.tiny else "llama3.2-1b-shape-random",
                                    "context": args.context, "dtype": args.dtype, "repeats": args.repeats,
                                    "decode_tokens": args.decode_tokens, "machine": machine, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
