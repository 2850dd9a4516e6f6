"""The serving engine without its HTTP server: the same requests and steps as `serve_capacity.py`, submitted in
one process, timed by forward kind. With `--wake HZ` a thread (or `--wake-process`: another process) wakes HZ
times a second and does almost nothing, to show what other work on the machine costs the engine's threads.

    python benchmarks/serve_engine_alone.py --ratio 0.75 --requests 16 --max-tokens 256
    python benchmarks/serve_engine_alone.py --ratio 0.75 --requests 7 --max-tokens 16 --wake 50
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import threading
import time


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--ratio", type=float, default=0.75, help="snapkv's compression ratio")
    parser.add_argument("--requests", type=int, default=16)
    parser.add_argument("--prompt-tokens", type=int, default=2048)
    parser.add_argument("--max-tokens", type=int, default=256)
    parser.add_argument("--kv-budget", type=int, default=219_970_800, help="bytes (serve_capacity.py's default)")
    parser.add_argument("--wake", type=float, default=0.0, help="wake-ups per second of a thread beside the engine")
    parser.add_argument("--wake-process", action="store_true", help="the waker is another process, not a thread")
    parser.add_argument("--out", help="JSON file for the results")
    args = parser.parse_args()
    if args.wake < 0:
        parser.error(f"--wake must be >= 0, got {args.wake}")

    from kvevict.data import haystack
    from kvevict.models import load_model
    from kvevict.policies import make_policy
    from kvevict.serve.engine import Engine, Request, Sampling

    model, tok = load_model(args.model, dtype="float32")
    engine = Engine(model, tok, kv_budget=args.kv_budget, prefill_chunk=256)
    ids = tok(haystack(tok, args.requests * args.prompt_tokens + 1000)).input_ids
    seconds = {"prefill": 0.0, "packed": 0.0, "decode": 0.0}
    counts = dict.fromkeys(seconds, 0)
    rows = dict.fromkeys(seconds, 0)
    forward = engine._forward

    def timed(prefilling):
        kind = "prefill" if not engine.running else "packed" if prefilling is not None else "decode"
        rows[kind] += len(engine.running)
        started = time.perf_counter()
        forward(prefilling)
        seconds[kind] += time.perf_counter() - started
        counts[kind] += 1

    engine._forward = timed
    policy = make_policy("snapkv", compression_ratio=args.ratio, decode_interval=64)
    length = args.prompt_tokens - 1
    for i in range(args.requests):
        engine.submit(Request(prompt_ids=ids[i * length:(i + 1) * length], max_tokens=args.max_tokens,
                              policy=policy, sampling=Sampling(temperature=0)))
    waker = None
    if args.wake and args.wake_process:
        waker = subprocess.Popen([sys.executable, "-c", f"import time\nwhile True:\n time.sleep({1 / args.wake})"])
    elif args.wake:
        def wake():
            while True:
                time.sleep(1 / args.wake)
        threading.Thread(target=wake, daemon=True).start()
    started = time.perf_counter()
    try:
        while engine.waiting or engine.prefilling or engine.running:
            engine.step()
    finally:
        if waker is not None:
            waker.kill()
    wall = time.perf_counter() - started
    result = {"args": vars(args), "wall_seconds": wall, "output_tokens_per_s": args.requests * args.max_tokens / wall,
              "peak_running": engine.peak_running,
              "forwards": {k: {"n": counts[k], "seconds": seconds[k],
                               "mean_rows": rows[k] / counts[k] if counts[k] else 0.0} for k in seconds}}
    print(json.dumps(result, indent=2))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
