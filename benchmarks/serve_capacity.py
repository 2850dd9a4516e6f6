"""Freed KV memory turned into requests served: `kvevict serve` at a fixed KV budget, with and without eviction.

One run starts the server twice on 127.0.0.1 with the same --kv-budget (by default: what two full-cache requests
need at their peak, by the server's own prediction), once per ratio, and offers each the same load with the load
generator (`kvevict bench serve`): N requests of P prompt tokens and G new tokens, all at once. It prints the two
results side by side with their ratios and writes them as JSON.

    python benchmarks/serve_capacity.py --out results/serve_capacity_smollm2.json
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

from kvevict.serve.loadgen import LoadSpec, run_load, wait_until_healthy


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def full_cache_budget(args) -> int:
    """Bytes two full-cache requests of the benchmark's size need at their peak (the server's prediction)."""
    from kvevict.models import load_model
    from kvevict.policies import make_policy
    from kvevict.serve.engine import Engine

    model, tok = load_model(args.model, dtype=args.dtype)
    engine = Engine(model, tok, kv_budget=1, prefill_chunk=args.prefill_chunk)
    policy = engine.effective_policy(make_policy(args.policy, compression_ratio=0.0, **json.loads(args.policy_args)))
    return 2 * engine.estimate(policy, args.prompt_tokens, args.max_tokens).peak


def serve_and_load(args, ratio: float, budget: int) -> dict:
    port = free_port()
    policy_args = json.dumps({"compression_ratio": ratio, **json.loads(args.policy_args)})
    command = [sys.executable, "-m", "kvevict.cli", "serve", "--model", args.model, "--policy", args.policy,
               "--policy-args", policy_args, "--kv-budget", str(budget), "--port", str(port),
               "--prefill-chunk", str(args.prefill_chunk), "--dtype", args.dtype]
    log = open(Path(args.out).with_suffix(f".ratio{ratio:g}.log"), "w")
    server = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        if not wait_until_healthy(url, server, timeout=300):
            raise RuntimeError(f"the server did not start; see {log.name}")
        print(f"\n== ratio {ratio:g}: {' '.join(command[2:])}", flush=True)
        spec = LoadSpec(url=url, concurrency=args.requests, requests=args.requests, prompt_tokens=args.prompt_tokens,
                        max_tokens=args.max_tokens, timeout=args.timeout)
        return run_load(spec)
    finally:
        server.send_signal(signal.SIGINT)
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
        log.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--policy", default="snapkv")
    parser.add_argument("--policy-args", default='{"decode_interval": 64}', help="JSON, for both runs")
    parser.add_argument("--ratios", default="0.75,0", help="comma-separated; the last is the reference")
    parser.add_argument("--requests", type=int, default=16)
    parser.add_argument("--prompt-tokens", type=int, default=2048)
    parser.add_argument("--max-tokens", type=int, default=256)
    parser.add_argument("--prefill-chunk", type=int, default=256)
    parser.add_argument("--kv-budget", type=int, help="bytes (default: two full-cache requests at their peak)")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--timeout", type=float, default=3600)
    parser.add_argument("--out", default="results/serve_capacity.json")
    args = parser.parse_args()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    budget = args.kv_budget or full_cache_budget(args)
    ratios = [float(r) for r in args.ratios.split(",")]
    runs = {ratio: serve_and_load(args, ratio, budget) for ratio in ratios}
    keys = [("output tokens/s", "output_tokens_per_s", ".1f"), ("requests/s", "requests_per_s", ".3f"),
            ("peak requests running", "peak_running_server", ".0f"), ("wall time (s)", "wall_seconds", ".1f"),
            ("TTFT p50 (s)", "ttft_p50_s", ".2f"), ("ITL p50 (ms)", "itl_p50_s", ".1f"),
            ("peak KV MiB", "kv_bytes_peak_server", ".1f"), ("preemptions", "preemptions", ".0f")]
    print(f"\n{args.model}, {args.policy}, {args.requests} requests x ({args.prompt_tokens} prompt + {args.max_tokens} "
          f"new tokens), KV budget {budget:,} bytes ({budget / 2**20:.1f} MiB), {os.cpu_count()} CPUs")
    header = f"{'':<24}" + "".join(f"{'ratio ' + format(r, 'g'):>14}" for r in ratios) + f"{'first/last':>12}"
    print(header)
    for label, key, fmt in keys:
        values = [runs[r][key] for r in ratios]
        scale = 1000 if key == "itl_p50_s" else 2**-20 if key.startswith("kv_bytes") else 1
        cells = "".join(f"{'-' if v is None else format(v * scale, fmt):>14}" for v in values)
        ratio = values[0] / values[-1] if values[0] is not None and values[-1] else None
        print(f"{label:<24}{cells}{'-' if ratio is None else format(ratio, '.2f') + 'x':>12}")
    result = {"model": args.model, "policy": args.policy, "policy_args": json.loads(args.policy_args),
              "kv_budget_bytes": budget, "requests": args.requests, "prompt_tokens": args.prompt_tokens,
              "max_tokens": args.max_tokens, "prefill_chunk": args.prefill_chunk, "cpus": os.cpu_count(),
              "command": " ".join(sys.argv), "runs": {format(r, "g"): runs[r] for r in ratios}}
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
