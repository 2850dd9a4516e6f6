"""How many requests vLLM runs at once, and how fast, with the kvevict plugin on and off, for the same KV cache.

The KV cache (`kv_cache_memory_bytes`) holds exactly `--cache-requests` full requests (prompt + new tokens, in
whole blocks), e.g. two. `--requests` prompts of `--prompt-tokens` essay tokens each (Paul Graham essays, cut with the model's
tokenizer, each request starting at a different token) are submitted at once; every request generates exactly
`--new-tokens` tokens (greedy, EOS ignored). Each engine runs in its own subprocess, one after the other, with the
engine in-process there (VLLM_ENABLE_V1_MULTIPROCESSING=0) so that its scheduler can be observed step by step.

Measured per engine, from the scheduler's steps (a wrapper around `schedule` and `update_from_output`):
- peak running: the most requests in the scheduler's running queue after any `schedule` call;
- output tokens/s: output tokens / wall time of `LLM.generate` (end to end, prefills included);
- decode tokens/s: output tokens of steps that schedule no prompt token / the summed duration of those steps
  (`schedule` start to `update_from_output` end);
- tail tokens/s: output tokens after the end of the last step with prompt tokens / the time from then to the end.

    python benchmarks/vllm_capacity.py --out results/vllm_capacity_smollm2.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

MODEL = "smollm2-135m"


def prompt_ids(tokenizer, count: int, tokens: int) -> list[list[int]]:
    """`count` prompts of exactly `tokens` token ids, cut from the essays at different starts."""
    from kvevict.data import essays

    ids: list[int] = []
    for _, text in essays():
        ids.extend(tokenizer.encode(text + "\n\n", add_special_tokens=False))
    stride = max(1, (len(ids) - tokens) // count)
    if len(ids) < tokens + (count - 1) * 64:
        raise ValueError(f"the essays hold {len(ids)} tokens, too few for {count} prompts of {tokens}")
    return [ids[i * stride:i * stride + tokens] for i in range(count)]


def bytes_per_token(hf_config, dtype_bytes: int) -> int:
    """KV bytes one token takes in every layer (keys and values)."""
    heads = hf_config.num_attention_heads
    kv_heads = getattr(hf_config, "num_key_value_heads", None) or heads
    head_dim = getattr(hf_config, "head_dim", None) or hf_config.hidden_size // heads
    return hf_config.num_hidden_layers * kv_heads * head_dim * 2 * dtype_bytes


def run_engine(job: dict) -> dict:
    """One engine (plugin on when job["kvevict"] is a dict): generate, and record the scheduler's steps."""
    import torch
    from transformers import AutoConfig, AutoTokenizer
    from vllm import LLM, SamplingParams

    import kvevict.vllm
    from kvevict.models import model_path

    kvevict.vllm.register()  # what vLLM's entry point does in a server
    path = str(model_path(MODEL))
    tokenizer = AutoTokenizer.from_pretrained(path)
    prompts = prompt_ids(tokenizer, job["requests"], job["prompt_tokens"])
    dtype = getattr(torch, job["dtype"])
    per_token = bytes_per_token(AutoConfig.from_pretrained(path), torch.empty(0, dtype=dtype).element_size())
    # the pool holds `cache_requests` full requests in whole blocks, plus vLLM's null block (never allocated)
    block_size = job["block_size"]
    request_blocks = -(-(job["prompt_tokens"] + job["new_tokens"]) // block_size)
    cache_bytes = (job["cache_requests"] * request_blocks + 1) * block_size * per_token
    extra = {} if job["kvevict"] is None else {"additional_config": {"kvevict": job["kvevict"]}}
    llm = LLM(path, dtype=job["dtype"], enforce_eager=True, max_model_len=job["prompt_tokens"] + job["new_tokens"],
              max_num_batched_tokens=job["max_num_batched_tokens"], max_num_seqs=job["requests"],
              block_size=block_size, kv_cache_memory_bytes=cache_bytes, enable_prefix_caching=False, seed=0,
              **extra)
    core = llm.llm_engine.engine_core.engine_core
    scheduler = core.scheduler
    assert scheduler.cache_config.block_size == block_size
    pool_blocks = scheduler.kv_cache_manager.block_pool.num_gpu_blocks - 1  # block 0 is vLLM's null block

    params = SamplingParams(max_tokens=job["new_tokens"], temperature=0, ignore_eos=True)
    # warm-up: one short request, not measured
    llm.generate([{"prompt_token_ids": prompts[0][:64]}], SamplingParams(max_tokens=4, temperature=0),
                 use_tqdm=False)

    steps: list[dict] = []
    schedule, update = scheduler.schedule, scheduler.update_from_output

    def timed_schedule(*args, **kwargs):
        began = time.perf_counter()
        output = schedule(*args, **kwargs)
        scheduled = output.num_scheduled_tokens
        prefill = sum(n for rid, n in scheduled.items()
                      if scheduler.requests[rid].num_computed_tokens <= scheduler.requests[rid].num_prompt_tokens)
        steps.append({"began": began, "running": len(scheduler.running), "waiting": len(scheduler.waiting),
                      "requests": len(scheduled), "prefill_requests": sum(
                          1 for rid in scheduled
                          if scheduler.requests[rid].num_computed_tokens <= scheduler.requests[rid].num_prompt_tokens),
                      "prefill_tokens": prefill,
                      "preempted": len(getattr(output, "preempted_req_ids", None) or ()),
                      "free_blocks": scheduler.kv_cache_manager.block_pool.get_num_free_blocks()})
        return output

    def timed_update(scheduler_output, model_runner_output):
        result = update(scheduler_output, model_runner_output)
        if steps:
            steps[-1]["ended"] = time.perf_counter()
        return result

    scheduler.schedule, scheduler.update_from_output = timed_schedule, timed_update
    began = time.perf_counter()
    outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    wall = time.perf_counter() - began
    scheduler.schedule, scheduler.update_from_output = schedule, update

    steps = [s for s in steps if "ended" in s and s["requests"]]
    produced = sum(len(o.outputs[0].token_ids) for o in outputs)
    # a step produces one token per request that is decoding or that ends its prefill; only count decode-only steps
    decode_steps = [s for s in steps if s["prefill_tokens"] == 0]
    decode_tokens = sum(s["requests"] for s in decode_steps)
    decode_seconds = sum(s["ended"] - s["began"] for s in decode_steps)
    last_prefill = max((i for i, s in enumerate(steps) if s["prefill_tokens"]), default=-1)
    tail = steps[last_prefill + 1:]
    tail_seconds = (tail[-1]["ended"] - steps[last_prefill]["ended"]) if tail and last_prefill >= 0 else 0.0
    result = {
        "kvevict": job["kvevict"], "requests": job["requests"], "prompt_tokens": job["prompt_tokens"],
        "new_tokens": job["new_tokens"], "dtype": job["dtype"], "block_size": block_size,
        "request_blocks": request_blocks, "cache_blocks": pool_blocks, "cache_tokens": pool_blocks * block_size,
        "kv_cache_memory_bytes": cache_bytes, "kv_bytes_per_token": per_token, "output_tokens": produced,
        "all_requests_complete": all(len(o.outputs[0].token_ids) == job["new_tokens"] for o in outputs),
        "wall_seconds": wall, "output_tokens_per_s": produced / wall,
        "peak_running": max(s["running"] for s in steps),
        "mean_running": sum(s["running"] * (s["ended"] - s["began"]) for s in steps)
        / sum(s["ended"] - s["began"] for s in steps),
        "steps": len(steps), "preemptions": sum(s["preempted"] for s in steps),
        "decode_steps": len(decode_steps), "decode_tokens": decode_tokens, "decode_seconds": decode_seconds,
        "decode_tokens_per_s": decode_tokens / decode_seconds if decode_seconds else None,
        "tail_tokens": sum(s["requests"] for s in tail), "tail_seconds": tail_seconds,
        "tail_tokens_per_s": sum(s["requests"] for s in tail) / tail_seconds if tail_seconds else None,
        "running_per_step": [s["running"] for s in steps],
    }
    if job["kvevict"] is not None:
        runner = core.model_executor.driver_worker.worker.model_runner
        result["blocks_freed"] = scheduler.kvevict_blocks_freed
        result["eviction_seconds"] = runner.kvevict_seconds
    return result


def wait_for_load(threshold: float, until: str | None, poll: float) -> dict:
    """Wait until the 1-minute load average is below `threshold` (or until the UTC time `until`, HH:MM)."""
    import datetime

    deadline = None
    if until:
        now = datetime.datetime.now(datetime.timezone.utc)
        hour, minute = map(int, until.split(":"))
        deadline = now.replace(hour=hour, minute=minute, second=0, microsecond=0)
    waited = 0.0
    while os.getloadavg()[0] >= threshold:
        if deadline is None or datetime.datetime.now(datetime.timezone.utc) >= deadline:
            break
        print(f"load {os.getloadavg()[0]:.2f} >= {threshold}: waiting", file=sys.stderr, flush=True)
        time.sleep(poll)
        waited += poll
    return {"load_1m": os.getloadavg()[0], "below_threshold": os.getloadavg()[0] < threshold, "waited_s": waited}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=16)
    parser.add_argument("--prompt-tokens", type=int, default=2000)
    parser.add_argument("--new-tokens", type=int, default=256)
    parser.add_argument("--cache-requests", type=int, default=2, help="full requests the KV cache holds")
    parser.add_argument("--policy", default="snapkv")
    parser.add_argument("--ratio", type=float, default=0.75)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--max-num-batched-tokens", type=int, default=2048)
    parser.add_argument("--block-size", type=int, default=128, help="vLLM's CPU default")
    parser.add_argument("--wait-load", type=float, default=None, help="first wait for a 1-minute load below this")
    parser.add_argument("--wait-until", default=None, help="stop waiting at this UTC time (HH:MM)")
    parser.add_argument("--out", default=None)
    parser.add_argument("--engine", default=None, help=argparse.SUPPRESS)  # a subprocess's job (JSON)
    args = parser.parse_args()
    if args.engine:
        print(json.dumps(run_engine(json.loads(args.engine))))
        return

    load = wait_for_load(args.wait_load, args.wait_until, 30) if args.wait_load else None
    env = dict(os.environ, VLLM_ENABLE_V1_MULTIPROCESSING="0", OMP_NUM_THREADS="1",
               VLLM_CPU_OMP_THREADS_BIND="nobind")
    job = {"requests": args.requests, "prompt_tokens": args.prompt_tokens, "new_tokens": args.new_tokens,
           "cache_requests": args.cache_requests, "dtype": args.dtype, "block_size": args.block_size,
           "max_num_batched_tokens": args.max_num_batched_tokens}
    runs = {}
    for name, config in (("off", None), (f"{args.policy} {args.ratio}",
                                         {"policy": args.policy, "compression_ratio": args.ratio})):
        before = os.getloadavg()[0]
        done = subprocess.run([sys.executable, __file__, "--engine", json.dumps(dict(job, kvevict=config))],
                              env=env, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            sys.exit(f"engine {name} failed:\n{done.stderr[-6000:]}")
        runs[name] = json.loads(done.stdout.strip().splitlines()[-1])
        runs[name]["load_1m_before"], runs[name]["load_1m_after"] = before, os.getloadavg()[0]
        print(f"{name}: done in {runs[name]['wall_seconds']:.0f} s", file=sys.stderr, flush=True)

    off, on = runs["off"], runs[f"{args.policy} {args.ratio}"]
    ratios = {key: (on[key] / off[key] if on[key] and off[key] else None)
              for key in ("peak_running", "output_tokens_per_s", "decode_tokens_per_s", "tail_tokens_per_s")}
    print(f"{args.requests} requests x {args.prompt_tokens} prompt tokens + {args.new_tokens} new, KV cache "
          f"{off['cache_tokens']} tokens ({off['cache_blocks']} blocks of {off['block_size']})")
    print("| engine | peak running | mean running | output tok/s | decode tok/s | tail tok/s | preemptions | wall s |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for name, run in runs.items():
        print(f"| {name} | {run['peak_running']} | {run['mean_running']:.2f} | {run['output_tokens_per_s']:.1f} | "
              f"{run['decode_tokens_per_s']:.1f} | {(run['tail_tokens_per_s'] or 0):.1f} | {run['preemptions']} | "
              f"{run['wall_seconds']:.0f} |")
    print("| ratio | " + " | ".join(f"{ratios[k]:.2f}x" if ratios[k] else "-" for k in
                                      ("peak_running",)) + " | | " + " | ".join(
        f"{ratios[k]:.2f}x" if ratios[k] else "-" for k in ("output_tokens_per_s", "decode_tokens_per_s",
                                                            "tail_tokens_per_s")) + " | | |")
    if args.out:
        os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
        with open(args.out, "w") as f:
            json.dump({"model": MODEL, "command": " ".join(["python"] + sys.argv), "cpu_count": os.cpu_count(),
                       "load_wait": load, "ratios": ratios, "runs": runs}, f, indent=1)


if __name__ == "__main__":
    main()
