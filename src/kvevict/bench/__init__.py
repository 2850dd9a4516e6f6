"""Speed and memory benchmark: prefill seconds, decode tokens/s, peak memory and KV bytes per configuration.

Each configuration runs in a fresh Python process, so peak memory belongs to that configuration alone (CUDA:
max allocated; CPU: the peak resident set size above what the loaded model holds, with the kernel's peak counter
reset once the model is loaded). Results are printed as a table and written as JSON.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

DEFAULT_CONFIGS = (
    {"label": "transformers DynamicCache (sdpa)", "policy": None},
    {"label": "full", "policy": "full"},
    {"label": "snapkv 0.75 uniform", "policy": "snapkv", "params": {"compression_ratio": 0.75}},
    {"label": "snapkv 0.75 head", "policy": "snapkv", "params": {"compression_ratio": 0.75, "allocation": "head"}},
    {"label": "snapkv 0.75 uniform, chunks of 1024", "policy": "snapkv",
     "params": {"compression_ratio": 0.75, "prefill_chunk": 1024}},
)

# A random-weight model with Llama-3.1-8B's shapes (for GPU runs; no weights needed).
LLAMA3_8B_SHAPE = dict(
    vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
    num_key_value_heads=8, head_dim=128, max_position_embeddings=131072, rope_theta=500000.0,
)


@dataclass
class BenchSpec:
    model: str = "smollm2-135m"
    context: int = 4096
    batch: int = 1
    decode_tokens: int = 128
    dtype: str = "float32"
    device: str = "cpu"
    threads: int | None = None
    configs: list = field(default_factory=lambda: [dict(c) for c in DEFAULT_CONFIGS])


def _rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def _peak_rss_mb() -> float:
    """Peak RSS since the last `_reset_peak_rss()` (Linux VmHWM)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def _reset_peak_rss() -> None:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets the peak RSS counter (VmHWM), Linux >= 4.0
    except OSError:
        pass


def load_bench_model(name: str, dtype: str, device: str):
    import torch

    from ..models import load_model, resolve_dtype

    if name == "llama3-8b-random":
        from transformers import AutoModelForCausalLM, LlamaConfig

        with torch.device(device):
            model = AutoModelForCausalLM.from_config(LlamaConfig(**LLAMA3_8B_SHAPE), dtype=resolve_dtype(dtype))
        return model.eval(), None
    model, tok = load_model(name, dtype=dtype, device=device)
    return model, tok


def run_one(spec: BenchSpec, config: dict) -> dict:
    """Time one configuration in this process."""
    import torch
    from transformers import DynamicCache

    from ..api import prefill
    from ..cache import EvictingCache
    from ..compat import cache_kwargs
    from ..data import haystack
    from ..policies import make_policy

    if spec.threads:
        torch.set_num_threads(spec.threads)
    cuda = spec.device.startswith("cuda")
    model, tok = load_bench_model(spec.model, spec.dtype, spec.device)
    vocab = model.config.get_text_config().vocab_size
    if tok is not None:
        ids = tok(haystack(tok, spec.context), return_tensors="pt", add_special_tokens=False).input_ids[:, : spec.context]
    else:
        ids = torch.randint(10, vocab - 10, (1, spec.context), generator=torch.Generator().manual_seed(0))
    ids = ids.repeat(spec.batch, 1).to(spec.device)
    mask = torch.ones_like(ids)

    def sync():
        if cuda:
            torch.cuda.synchronize()

    if config.get("policy") is None:
        model.set_attn_implementation("sdpa")
        cache = DynamicCache(config=model.config)
    else:
        cache = EvictingCache(model, make_policy(config["policy"], **config.get("params", {})))
    baseline_mb = torch.cuda.memory_allocated() / 2**20 if cuda else _rss_mb()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    else:
        _reset_peak_rss()
    with torch.no_grad():
        sync()
        start = time.perf_counter()
        chunk = getattr(getattr(cache, "policy", None), "prefill_chunk", None)
        if chunk:  # all but the last token in chunks (evicting after each), then the last one
            prefill(model, cache, ids[:, :-1], mask[:, :-1], chunk)
            out = model(input_ids=ids[:, -1:], attention_mask=mask, **cache_kwargs(cache))
        else:
            out = model(input_ids=ids, attention_mask=mask, **cache_kwargs(cache), logits_to_keep=1)
        sync()
        prefill_s = time.perf_counter() - start
        kv_after_prefill = _kv_bytes(cache)
        token = out.logits[:, -1:].argmax(-1)
        step_times = []
        for _ in range(spec.decode_tokens):
            mask = torch.cat([mask, torch.ones_like(token)], dim=1)
            sync()
            start = time.perf_counter()
            out = model(input_ids=token, attention_mask=mask, **cache_kwargs(cache))
            sync()
            step_times.append(time.perf_counter() - start)
            token = out.logits[:, -1:].argmax(-1)
    peak_mb = (torch.cuda.max_memory_allocated() / 2**20 if cuda else _peak_rss_mb()) - baseline_mb
    decode_s = sum(step_times)
    return {
        "label": config["label"], "policy": config.get("policy"), "params": config.get("params", {}),
        "prefill_s": prefill_s, "decode_tok_per_s": spec.batch * spec.decode_tokens / decode_s if decode_s else None,
        "decode_ms_per_step": 1000 * decode_s / max(1, spec.decode_tokens),
        "peak_mb_above_model": peak_mb, "kv_mb_after_prefill": kv_after_prefill / 2**20,
        "kv_mb_end": _kv_bytes(cache) / 2**20, "full_kv_mb_end": _full_kv_bytes(cache, model) / 2**20,
    }


def _kv_bytes(cache) -> int:
    if hasattr(cache, "nbytes"):
        return cache.nbytes()
    return sum(l.keys.numel() * l.keys.element_size() * 2 for l in cache.layers if l.keys is not None)


def _full_kv_bytes(cache, model) -> int:
    if hasattr(cache, "full_nbytes"):
        return cache.full_nbytes()
    return _kv_bytes(cache)


def run(spec: BenchSpec, out: Path | None = None, progress: bool = True) -> dict:
    """Run every configuration of `spec` in its own process; print a table; write JSON to `out`."""
    from tqdm import tqdm

    rows = []
    for config in tqdm(spec.configs, desc="bench", disable=not progress):
        payload = json.dumps({"spec": asdict(spec), "config": config})
        proc = subprocess.run([sys.executable, "-m", "kvevict.bench", payload], capture_output=True, text=True,
                              env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
        if proc.returncode != 0:
            raise RuntimeError(f"benchmark config {config['label']!r} failed:\n{proc.stderr[-4000:]}")
        rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    result = {"spec": {k: v for k, v in asdict(spec).items() if k != "configs"}, "machine": _machine(spec), "rows": rows}
    print(format_table(result))
    write_json(result, out)
    return result


def write_json(result: dict, out: Path | str | None) -> None:
    """Write a benchmark's result as JSON to `out` (folders made as needed); nothing when `out` is None."""
    if out is None:
        return
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(f"wrote {out}")


def _machine(spec: BenchSpec) -> dict:
    import platform

    import torch
    import transformers

    info = {"python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
            "cpus": os.cpu_count(), "threads": spec.threads or torch.get_num_threads()}
    if spec.device.startswith("cuda") and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    info["cpu_bf16"] = _cpu_bf16_flags()
    return info


def _cpu_bf16_flags() -> list[str]:
    """The CPU's bfloat16 extensions (Linux: AVX512-BF16, AMX): with AMX-BF16 a bf16 model runs several times
    faster, which moves every overhead ratio measured against it."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), [])
    except OSError:
        return []
    return sorted(flag for flag in set(flags) if flag in ("avx512_bf16", "amx_bf16", "amx_tile"))


def format_table(result: dict) -> str:
    spec = result["spec"]
    head = (f"model={spec['model']} context={spec['context']} batch={spec['batch']} decode={spec['decode_tokens']} "
            f"dtype={spec['dtype']} device={spec['device']}")
    lines = [head, "| config | prefill s | decode tok/s | peak MB above model | KV MB after prefill | KV MB end (full) |",
             "|---|---:|---:|---:|---:|---:|"]
    for r in result["rows"]:
        lines.append(
            f"| {r['label']} | {r['prefill_s']:.2f} | {r['decode_tok_per_s']:.1f} | {r['peak_mb_above_model']:.0f} | "
            f"{r['kv_mb_after_prefill']:.1f} | {r['kv_mb_end']:.1f} ({r['full_kv_mb_end']:.1f}) |"
        )
    return "\n".join(lines)
