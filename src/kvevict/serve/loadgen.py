"""`kvevict bench serve`: offer a running server (loopback only) a bounded load and measure what it serves.

Prompts are cut from the essays to exactly `prompt_tokens` tokens with the server's own tokenizer (its /tokenize),
each request starting at a different place so no two are alike. Every request streams, so time to first token
(TTFT) and the gaps between streamed chunks (ITL) are measured at the client; the server's /metrics is sampled
throughout for requests running at once and K/V bytes held.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from urllib.parse import urlparse

LOOPBACK = {"127.0.0.1", "localhost", "::1"}


@dataclass
class LoadSpec:
    url: str = "http://127.0.0.1:8000"
    concurrency: int = 16
    requests: int = 16
    prompt_tokens: int = 2048
    max_tokens: int = 256
    timeout: float = 1800.0
    policy_args: dict | None = None  # sent as the request's `kvevict` field

    def validate(self) -> None:
        host = urlparse(self.url).hostname
        if host not in LOOPBACK:
            raise ValueError(f"the load generator only targets this machine ({', '.join(sorted(LOOPBACK))}); got {host!r}")
        for name in ("concurrency", "requests", "prompt_tokens", "max_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.requests > 10_000:
            raise ValueError(f"requests must be <= 10000 (a bounded load), got {self.requests}")
        if not 0 < self.timeout <= 24 * 3600:
            raise ValueError(f"timeout must be in (0, 86400] seconds, got {self.timeout}")


def wait_until_healthy(url: str, process, timeout: float = 300.0) -> bool:
    """Poll `url`/health until it answers 200 (True), or `process` (a Popen) exits or `timeout` seconds pass (False)."""
    import httpx

    deadline = time.monotonic() + timeout
    while True:
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return True
        except httpx.HTTPError:
            pass
        if process.poll() is not None or time.monotonic() > deadline:
            return False
        time.sleep(0.5)


def parse_metrics(text: str) -> dict[str, float]:
    """Prometheus text -> {metric name (labels dropped, summed): value}."""
    values: dict[str, float] = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        name_part, _, value = line.rpartition(" ")
        name = name_part.split("{", 1)[0]
        try:
            values[name] = values.get(name, 0.0) + float(value)
        except ValueError:
            continue
    return values


# seconds between two looks at the server's /metrics: each look takes CPU from the server under test, and the
# server keeps its own peaks (running requests, KV bytes) besides
SAMPLE_EVERY = 1.0


def engine_seconds(text: str) -> dict[str, float]:
    """The server's engine time counters from its Prometheus text: {"step": s, "forward:<kind>": s,
    "forwards:<kind>": count} (kvevict servers only; other servers give {})."""
    found: dict[str, float] = {}
    for line in text.splitlines():
        if not line.startswith("kvevict:engine_"):
            continue
        name_part, _, value = line.rpartition(" ")
        name = name_part.split("{", 1)[0]
        kind = name_part.split('kind="', 1)[1].split('"', 1)[0] if 'kind="' in name_part else None
        key = {"kvevict:engine_step_seconds_total": "step", "kvevict:engine_forward_seconds_total": "forward",
               "kvevict:engine_forwards_total": "forwards"}.get(name)
        if key is not None:
            found[key if kind is None else f"{key}:{kind}"] = float(value)
    return found


def _percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[round(q) - 1]


async def _prompts(client, spec: LoadSpec) -> list[list[int]]:
    from ..data import essays

    text = "\n\n".join(body for _, body in essays())
    response = await client.post(f"{spec.url}/tokenize", json={"prompt": text})
    response.raise_for_status()
    ids = response.json()["tokens"]
    stride = max(1, (len(ids) - spec.prompt_tokens) // max(1, spec.requests))
    if len(ids) < spec.prompt_tokens:
        raise ValueError(f"the essays hold {len(ids)} tokens, fewer than --prompt-tokens {spec.prompt_tokens}")
    return [ids[(i * stride) % (len(ids) - spec.prompt_tokens + 1):][: spec.prompt_tokens] for i in range(spec.requests)]


async def _one(client, spec: LoadSpec, prompt: list[int], record: dict) -> None:
    body = {"prompt": prompt, "max_tokens": spec.max_tokens, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}
    if spec.policy_args:
        body["kvevict"] = spec.policy_args
    start = time.monotonic()
    chunks = []
    async with client.stream("POST", f"{spec.url}/v1/completions", json=body) as response:
        if response.status_code != 200:
            record.update(error=f"HTTP {response.status_code}: {(await response.aread()).decode()[:300]}")
            return
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            payload = json.loads(line[6:])
            if payload.get("usage"):
                record["completion_tokens"] = payload["usage"]["completion_tokens"]
            if payload.get("choices") and payload["choices"][0].get("text"):
                chunks.append(time.monotonic())
    record.update(start=start, end=time.monotonic(), ttft=chunks[0] - start if chunks else None,
                  gaps=[b - a for a, b in itertools.pairwise(chunks)])


async def _sample_metrics(client, spec: LoadSpec, samples: list[dict], done: asyncio.Event) -> None:
    while not done.is_set():
        try:
            response = await client.get(f"{spec.url}/metrics")
            samples.append(parse_metrics(response.text))
        except Exception:  # a missed sample is not a failed run
            pass
        try:
            await asyncio.wait_for(done.wait(), timeout=SAMPLE_EVERY)
        except asyncio.TimeoutError:
            pass


async def _run(spec: LoadSpec) -> dict:
    import httpx

    timeout = httpx.Timeout(spec.timeout, connect=30.0)
    limits = httpx.Limits(max_connections=spec.concurrency + 4)
    async with httpx.AsyncClient(timeout=timeout, limits=limits, trust_env=False) as client:
        prompts = await _prompts(client, spec)
        records = [{} for _ in prompts]
        gate = asyncio.Semaphore(spec.concurrency)
        samples: list[dict] = []
        done = asyncio.Event()

        async def bounded(prompt, record):
            async with gate:
                await _one(client, spec, prompt, record)

        before = engine_seconds((await client.get(f"{spec.url}/metrics")).text)
        sampler = asyncio.create_task(_sample_metrics(client, spec, samples, done))
        started = time.monotonic()
        try:
            await asyncio.wait_for(asyncio.gather(*(bounded(p, r) for p, r in zip(prompts, records))), spec.timeout)
        finally:
            done.set()
            await sampler
        wall = time.monotonic() - started
        final_text = (await client.get(f"{spec.url}/metrics")).text
        final = parse_metrics(final_text)
        after = engine_seconds(final_text)
    ok = [r for r in records if "error" not in r and r.get("end")]
    tokens = sum(r.get("completion_tokens", 0) for r in ok)
    ttfts = [r["ttft"] for r in ok if r.get("ttft") is not None]
    gaps = [g for r in ok for g in r["gaps"]]
    running = [s.get("kvevict:num_requests_running", 0) for s in samples]
    kv = [s.get("kvevict:kv_cache_bytes", 0) for s in samples]
    return {
        "spec": asdict(spec), "requests_ok": len(ok), "errors": [r["error"] for r in records if "error" in r],
        "wall_seconds": wall, "output_tokens": tokens, "output_tokens_per_s": tokens / wall,
        "requests_per_s": len(ok) / wall,
        "ttft_p50_s": _percentile(ttfts, 50), "ttft_p95_s": _percentile(ttfts, 95),
        "itl_p50_s": _percentile(gaps, 50), "itl_p95_s": _percentile(gaps, 95),
        "peak_running_sampled": max(running, default=0),
        "peak_running_server": final.get("kvevict:num_requests_running_peak"),
        "kv_bytes_peak_sampled": max(kv, default=0), "kv_bytes_peak_server": final.get("kvevict:kv_cache_bytes_peak"),
        "kv_budget_bytes": final.get("kvevict:kv_cache_budget_bytes"),
        "preemptions": final.get("kvevict:num_preemptions_total", 0),
        "evicted_tokens": final.get("kvevict:evicted_tokens_total", 0),
        "metric_samples": len(samples),
        # where the server's engine spent the run (kvevict servers): its steps, and its forwards by kind
        "engine_seconds": {key: after[key] - before.get(key, 0.0) for key in after},
    }


def table(result: dict) -> str:
    def fmt(value, scale=1.0, digits=1):
        return "-" if value is None else f"{value * scale:,.{digits}f}"

    rows = [
        ("requests ok / offered", f"{result['requests_ok']} / {result['spec']['requests']}"),
        ("wall time (s)", fmt(result["wall_seconds"])),
        ("output tokens/s", fmt(result["output_tokens_per_s"])),
        ("requests/s", fmt(result["requests_per_s"], digits=3)),
        ("TTFT p50 / p95 (s)", f"{fmt(result['ttft_p50_s'], digits=2)} / {fmt(result['ttft_p95_s'], digits=2)}"),
        ("ITL p50 / p95 (ms)", f"{fmt(result['itl_p50_s'], 1000)} / {fmt(result['itl_p95_s'], 1000)}"),
        ("peak requests running", fmt(result["peak_running_server"], digits=0)),
        ("peak KV bytes (MiB) / budget", f"{fmt(result['kv_bytes_peak_server'], 2**-20)} / "
                                         f"{fmt(result['kv_budget_bytes'], 2**-20)}"),
        ("preemptions", fmt(result["preemptions"], digits=0)),
    ]
    engine = result.get("engine_seconds") or {}
    if engine:
        rows.append(("engine busy (s) / wall", f"{fmt(engine.get('step'))} / {fmt(result['wall_seconds'])}"))
        for kind in ("prefill", "packed", "decode"):
            if engine.get(f"forwards:{kind}"):
                rows.append((f"  {kind} forwards: n, s", f"{engine[f'forwards:{kind}']:.0f}, {fmt(engine[f'forward:{kind}'])}"))
    width = max(len(name) for name, _ in rows)
    return "\n".join(f"{name:<{width}}  {value}" for name, value in rows)


def run_load(spec: LoadSpec, out: Path | None = None) -> dict:
    spec.validate()
    result = asyncio.run(_run(spec))
    print(table(result))
    for error in result["errors"][:5]:
        print(f"error: {error}")
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2))
        print(f"wrote {out}")
    return result
