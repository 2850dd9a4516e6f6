"""The `kvevict` command: generate, demo, eval, bench, serve, profile, train, model-path, policies."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def _mb(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"


def _json_object(text: str | None, flag: str, example: str) -> dict:
    """The JSON object given to `flag` ({} when the flag is absent); an error naming the flag otherwise."""
    if not text:
        return {}
    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        raise ValueError(f"{flag} is not valid JSON ({err}): {text!r}; give an object, e.g. {example}") from None
    if not isinstance(value, dict):
        raise ValueError(f"{flag} must be a JSON object, e.g. {example}; got {text!r}")
    return value


def _policy_from_args(args):
    from .policies import make_policy

    params = _json_object(args.policy_args, "--policy-args", """'{"window": 64}'""")
    if args.ratio is not None:
        params["compression_ratio"] = args.ratio
    if args.budget is not None:
        params["budget"] = args.budget
    if args.allocation is not None:
        params["allocation"] = args.allocation
    if getattr(args, "recovery", None) is not None:
        params["recovery"] = args.recovery
    return make_policy(args.policy, **params)


def _add_policy_args(p: argparse.ArgumentParser, default_policy: str = "full") -> None:
    p.add_argument("--policy", default=default_policy, help="eviction policy (see `kvevict policies`)")
    p.add_argument("--ratio", type=float, help="compression ratio: fraction of KV pairs removed, in [0, 1)")
    p.add_argument("--budget", type=int, help="tokens kept per layer and KV head (instead of --ratio)")
    p.add_argument("--allocation", choices=["uniform", "head", "global"], help="how the budget is shared")
    p.add_argument("--policy-args", help="more policy parameters as JSON, e.g. '{\"window\": 64}'")


def cmd_generate(args) -> None:
    from .api import generate
    from .models import load_model

    if args.prompt_file:
        prompt = Path(args.prompt_file).read_text(encoding="utf-8")
    else:
        prompt = args.prompt
    if not prompt or not prompt.strip():
        raise SystemExit("the prompt is empty: give --prompt TEXT or --prompt-file F with some text")
    policy = _policy_from_args(args)  # validate before loading the model
    model, tok = load_model(args.model, dtype=args.dtype)
    texts, cache = generate(model, tok, [prompt], policy=policy, max_new_tokens=args.max_new_tokens, return_cache=True)
    print(texts[0])
    print(f"\n[{policy.describe()}] KV kept {_mb(cache.nbytes())} of {_mb(cache.full_nbytes())} "
          f"({100 * (1 - cache.nbytes() / max(1, cache.full_nbytes())):.1f}% saved)", file=sys.stderr)


DEMO_NEEDLE = "The secret passphrase for the lighthouse is violet-otter-42."
DEMO_QUESTION = "What is the secret passphrase for the lighthouse?"


def cmd_demo(args) -> None:
    from .api import generate
    from .data import haystack
    from .models import load_model
    from .policies import make_policy

    print(f"loading {args.model} ...", flush=True)
    model, tok = load_model(args.model, dtype=args.dtype)
    context = haystack(tok, args.context_tokens, DEMO_NEEDLE, depth=args.depth)
    prompt = f"{context}\n\nAnswer this question about the text above. {DEMO_QUESTION}"
    n_tokens = len(tok.encode(prompt))
    print(f"context: {n_tokens} tokens of Paul Graham essays; needle at {args.depth:.0%} depth: {DEMO_NEEDLE!r}")
    print(f"question: {DEMO_QUESTION}\n")
    runs = [("full cache", make_policy("full")), (f"{args.policy} @ {args.ratio}", make_policy(args.policy, compression_ratio=args.ratio))]
    full_bytes = None
    for label, policy in runs:
        texts, cache = generate(model, tok, [prompt], policy=policy, max_new_tokens=args.max_new_tokens, return_cache=True)
        kept = cache.nbytes()
        full_bytes = full_bytes or kept
        print(f"{label:>16}: {texts[0].strip()!r}")
        print(f"{'':>16}  KV bytes {kept:,} ({_mb(kept)}), {100 * (1 - kept / full_bytes):.1f}% saved vs full cache\n")


def _floats(text: str, name: str) -> list[float]:
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise SystemExit(f"--{name} must be comma-separated numbers, got {text!r}") from None


def cmd_eval(args) -> None:
    from .eval import EvalConfig, run_eval

    policy_args = _json_object(args.policy_args, "--policy-args",
                               """'{"window": 64}' or, per policy, '{"snapkv": {"window": 64}}'""")
    cfg = EvalConfig(
        model=args.model, policies=[p.strip() for p in args.policies.split(",") if p.strip()],
        ratios=_floats(args.ratios, "ratios"), tasks=[t.strip() for t in args.tasks.split(",") if t.strip()],
        context_length=args.context_length, samples=args.samples, seed=args.seed, out=args.out,
        policy_args=policy_args, query_aware=args.query_aware, dtype=args.dtype, max_new_tokens=args.max_new_tokens,
        continuation=args.continuation, longgen_tokens=args.longgen_tokens,
    )
    run_eval(cfg)
    print((Path(args.out) / "summary.md").read_text())
    print(f"wrote {args.out}/summary.csv, summary.md, score_vs_ratio.png")


def cmd_bench(args) -> None:
    from .bench import BenchSpec, run

    if args.compare:
        from .bench.compare import ROWS, CompareSpec, compare, format_table

        spec = CompareSpec(model=args.model, context=args.context, dtype=args.dtype, threads=args.threads,
                           repeats=args.repeats, decode_tokens=args.decode_tokens,
                           rows=[r for r in (args.rows or ",".join(ROWS)).split(",") if r])
        print(format_table(compare(spec, out=Path(args.out) if args.out else None)))
        return

    spec = BenchSpec(model=args.model, context=args.context, batch=args.batch, decode_tokens=args.decode_tokens,
                     dtype=args.dtype, device=args.device, threads=args.threads)
    run(spec, out=Path(args.out) if args.out else None)


def cmd_serve(args) -> None:
    try:
        from .serve import serve
        from .serve.memory import parse_bytes
    except ModuleNotFoundError as err:
        raise SystemExit(f"kvevict serve needs the serve extra ({err.name} is missing): pip install 'kvevict[serve]'") from None

    policy = _policy_from_args(args)  # validate before loading the model
    kv_budget = parse_bytes(args.kv_budget)
    if args.prefill_chunk < 1:
        raise ValueError(f"--prefill-chunk must be >= 1, got {args.prefill_chunk}")
    serve(args.model, policy, kv_budget, host=args.host, port=args.port, prefill_chunk=args.prefill_chunk,
          dtype=args.dtype, device=args.device)


def cmd_bench_serve(args) -> None:
    from .serve.loadgen import LoadSpec, run_load

    spec = LoadSpec(url=args.url, concurrency=args.concurrency, requests=args.requests,
                    prompt_tokens=args.prompt_tokens, max_tokens=args.max_tokens, timeout=args.timeout,
                    policy_args=_json_object(args.kvevict, "--kvevict", """'{"compression_ratio": 0.75}'""") or None)
    run_load(spec, out=Path(args.out) if args.out else None)


def cmd_profile(args) -> None:
    """Run a policy's profiling report (the policies in `kvevict.profiling.PROFILES`)."""
    from .data import haystack
    from .profiling import PROFILES

    policy = _policy_from_args(args)
    report = PROFILES.get(policy.name)
    if report is None:
        raise SystemExit(f"policy {policy.name!r} has no profiling report; these do: {', '.join(sorted(PROFILES))}")
    from .models import load_model

    model, tok = load_model(args.model, dtype=args.dtype)
    if args.prompt_file:
        prompt = Path(args.prompt_file).read_text(encoding="utf-8")
    else:
        prompt = haystack(tok, args.context_tokens)
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    print(report(model, tok, prompt, policy, out_dir))


def cmd_model_path(args) -> None:
    from .models import model_path

    print(model_path(args.name))


def cmd_policies(args) -> None:
    from .policies import list_policies, policy_class

    for name in list_policies():
        cls = policy_class(name)
        doc = (sys.modules[cls.__module__].__doc__ or cls.__doc__ or "").strip().splitlines()[0]
        print(f"{name:<14} {doc}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kvevict", description="KV-cache eviction for transformers models")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("generate", help="generate from a prompt with an evicting cache")
    p.add_argument("--model", required=True, help="embedded name (smollm2-135m, gemma3-270m, ...), HF id/dir or .gguf")
    _add_policy_args(p)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", help="prompt text")
    src.add_argument("--prompt-file", help="file holding the prompt")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--dtype", default="float32")
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("demo", help="needle in ~4k tokens of essays: full cache vs a 75%%-evicting policy")
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--policy", default="snapkv")
    p.add_argument("--ratio", type=float, default=0.75)
    p.add_argument("--context-tokens", type=int, default=4000)
    p.add_argument("--depth", type=float, default=0.5)
    p.add_argument("--max-new-tokens", type=int, default=24)
    p.add_argument("--dtype", default="float32")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("eval", help="sweep policies x ratios x tasks; resumable; writes CSV, Markdown and a plot")
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--policies", default="snapkv,h2o,streamingllm",
                   help="comma-separated policy names; NAME@LABEL runs NAME under its own label (e.g. ablations "
                        "with --policy-args '{\"ahakv@no-ra\": {\"recent_accumulation\": false}}')")
    p.add_argument("--ratios", default="0,0.5,0.75,0.9", help="comma-separated compression ratios in [0, 1)")
    p.add_argument("--tasks", default="niah_single,vt,fidelity",
                   help="comma-separated: niah_single, niah_multikey, niah_multivalue, niah_multiquery, vt, cwe, qa, "
                        "fidelity, longgen")
    p.add_argument("--context-length", type=int, default=4096)
    p.add_argument("--samples", type=int, default=20)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="runs/eval")
    p.add_argument("--policy-args", help="JSON parameters for every policy, or {policy: {...}} per policy")
    p.add_argument("--query-aware", action="store_true", help="put the question before compression")
    p.add_argument("--dtype", default="float32", help="float32 or bfloat16 (about 2x faster prefill on CPU)")
    p.add_argument("--max-new-tokens", type=int, help="answer length (default: per task)")
    p.add_argument("--continuation", type=int, default=64, help="fidelity: teacher-forced tokens after the context")
    p.add_argument("--longgen-tokens", type=int, default=256, help="longgen: tokens generated")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("bench", help="prefill time, decode speed, peak memory and KV bytes per configuration")
    p.add_argument("--model", default="smollm2-135m", help="a model name, or llama3-8b-random (random weights)")
    p.add_argument("--context", type=int, default=4096)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--decode-tokens", type=int, default=128)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int)
    p.add_argument("--out", help="JSON file for the results")
    p.add_argument("--compare", action="store_true",
                   help="each overhead (profiling, scoring, gates, per-head decode) as a ratio to the plain path, "
                        "in one process")
    p.add_argument("--rows", help="with --compare: which overheads, comma-separated (default: all)")
    p.add_argument("--repeats", type=int, default=2, help="with --compare: timings per row (the median is kept)")
    p.set_defaults(func=cmd_bench)
    targets = p.add_subparsers(dest="bench_target")
    q = targets.add_parser("serve", help="load a running server (loopback only): tokens/s, TTFT, ITL, peak requests")
    q.add_argument("--url", default="http://127.0.0.1:8000", help="the server (127.0.0.1, localhost or ::1 only)")
    q.add_argument("--concurrency", type=int, default=16, help="requests in flight at once")
    q.add_argument("--requests", type=int, default=16, help="requests in all")
    q.add_argument("--prompt-tokens", type=int, default=2048, help="prompt length (essays, cut to this many tokens)")
    q.add_argument("--max-tokens", type=int, default=256, help="tokens generated per request")
    q.add_argument("--timeout", type=float, default=1800, help="seconds before the run gives up")
    q.add_argument("--kvevict", help="per-request eviction settings sent in the kvevict field, as JSON")
    q.add_argument("--out", help="JSON file for the results")
    q.set_defaults(func=cmd_bench_serve)

    p = sub.add_parser("serve", help="OpenAI-compatible server: continuous batching under a KV byte budget")
    p.add_argument("--model", default="smollm2-135m", help="embedded name, HF id/dir or .gguf")
    _add_policy_args(p)
    p.add_argument("--kv-budget", default="512MiB", help="most K/V bytes held at once, e.g. 512MiB or 2GB")
    p.add_argument("--prefill-chunk", type=int, default=256,
                   help="prompt tokens per forward (a policy's own prefill_chunk wins)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--device", default="cpu")
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("profile", help="a policy's profiling report (FastGen head policies, AhaKV position bias)")
    p.add_argument("--model", default="smollm2-135m")
    _add_policy_args(p, default_policy="fastgen")
    p.add_argument("--recovery", type=float, help="FastGen's attention recovery threshold T")
    p.add_argument("--prompt-file", help="prompt to profile on (default: --context-tokens of essays)")
    p.add_argument("--context-tokens", type=int, default=4000)
    p.add_argument("--out", default="runs/profile", help="folder for the report's pictures")
    p.add_argument("--dtype", default="float32")
    p.set_defaults(func=cmd_profile)

    p = sub.add_parser("train", help="train gates: fastkvzip (forward-only) or attention-gate")
    trainers = p.add_subparsers(dest="trainer", required=True)
    import importlib
    import importlib.util

    from .train import TRAINERS

    for module_name in TRAINERS.values():
        if importlib.util.find_spec(module_name) is not None:
            importlib.import_module(module_name).add_parser(trainers)

    p = sub.add_parser("model-path", help="the local Hugging Face folder of an embedded model (written on first use)")
    p.add_argument("name", help="an embedded model: smollm2-135m, gemma3-270m, qwen2.5-coder-0.5b, ...")
    p.set_defaults(func=cmd_model_path)

    p = sub.add_parser("policies", help="list the eviction policies")
    p.set_defaults(func=cmd_policies)
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except (ValueError, ModuleNotFoundError, FileNotFoundError) as err:
        raise SystemExit(f"kvevict {args.command}: error: {err}") from None


if __name__ == "__main__":
    main()
