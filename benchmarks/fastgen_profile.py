"""FastGen head profiles on real models: which policy each (layer, KV head) gets, the compression that follows,
how much attention the chosen policies recover (on the profiled prompt rows and on later decoded queries), and
what profiling costs next to the prefill.

    python benchmarks/fastgen_profile.py                      # smollm2-135m and gemma3-270m, 4k-token essays
    python benchmarks/fastgen_profile.py --models smollm2-135m --tokens 1000

For each model, the prompt (essays, through the chat template when the tokenizer has one) is prefilled:
1. with the full cache (timing reference, after a warm-up);
2. once per profiling mode (every prompt row; the last --window rows) with FastGen observing but not evicting;
   each T is then applied to a copy of that cache (profiling does not depend on T);
3. the observed cache (nothing evicted) then decodes --continuation tokens greedily while the attention of each
   decoded query is recorded: "held-out recovery" of a head = 1 - the mean attention those queries put on the
   prompt keys the head's policy dropped at the end of prefill (decoded keys count as kept).

Writes profile.json, profile.md and heads_<model>_T<T>.png (every-row mode) into --out.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from dataclasses import dataclass
from pathlib import Path

import torch

import kvevict
from kvevict.attention import attention_probs
from kvevict.compat import cache_kwargs
from kvevict.data import haystack
from kvevict.policies.base import ObserverSet, Policy, PolicyState
from kvevict.policies.fastgen import CANDIDATES, token_kinds
from kvevict.profiling import achieved_ratio, plot_heads, prompt_ids, summarize, timed_prefill


class RecorderState(PolicyState):
    """Once `recording` is set, keeps each single-query forward's attention (group mean)."""

    def __init__(self, policy, geometry, tokenizer=None):
        super().__init__(policy, geometry, tokenizer)
        self.recording = False
        self.steps: dict[int, list[torch.Tensor]] = {}

    @property
    def observes(self) -> bool:
        return True

    def observe(self, layer_idx, ctx):
        if not self.recording or ctx.queries.shape[-2] != 1:
            return
        probs = attention_probs(ctx.queries, ctx.view.keys, ctx.query_positions, ctx.view.positions,
                               ctx.scaling)  # [B, H, G, 1, L]
        positions = ctx.view.positions[0, 0].long()
        assert bool((positions == torch.arange(positions.numel())).all()), "expects an unevicted, unpadded cache"
        self.steps.setdefault(layer_idx, []).append(probs.mean(2)[0, :, 0])  # [H, L]


@dataclass(frozen=True)
class AttentionRecorder(Policy):
    """Evicts nothing; its state records the attention of decoded queries."""

    name = "attention-recorder"
    State = RecorderState

    def score(self, state, layer_idx, ctx):
        return ctx.view.positions.float()


def held_out_recovery(recorder: RecorderState, cache, prompt_len: int) -> torch.Tensor:
    """Per (evictable layer, KV head): 1 - mean over the recorded decode queries of the attention on dropped prompt
    keys. [N_layers, H]."""
    rows = []
    for layer, steps in sorted(recorder.steps.items()):
        kept = cache.kept_positions(layer)[0]
        dropped = torch.ones(len(kept), prompt_len, dtype=torch.bool)
        for h, positions in enumerate(kept):
            dropped[h, positions[positions < prompt_len]] = False
        lost = torch.stack([(step[:, :prompt_len] * dropped).sum(-1) for step in steps])  # [steps, H]
        rows.append(1.0 - lost.mean(0))
    return torch.stack(rows)


def decode_greedy(model, cache, first_logits_ids: torch.Tensor, steps: int) -> list[int]:
    """Greedy tokens from an already prefilled cache (the prompt's last token is fed first)."""
    tokens = []
    with torch.no_grad():
        logits = model(input_ids=first_logits_ids, **cache_kwargs(cache), logits_to_keep=1).logits
        for _ in range(steps):
            token = int(logits[0, -1].argmax())
            tokens.append(token)
            logits = model(input_ids=torch.tensor([[token]]), **cache_kwargs(cache), logits_to_keep=1).logits
    return tokens


def decode_timing(model, observed, last: torch.Tensor, steps: int, recovery: float) -> dict:
    """Seconds per decoded token and KV bytes after `steps` tokens: full cache vs FastGen re-applying each head's
    rule every step (the paper) or every 32 steps (kvevict's default), all forked from one observed prefill."""
    out = {}
    for label, policy in (("full", kvevict.make_policy("full")),
                          ("fastgen, decode_interval=1", kvevict.make_policy("fastgen", recovery=recovery,
                                                                              decode_interval=1)),
                          ("fastgen, decode_interval=32", kvevict.make_policy("fastgen", recovery=recovery,
                                                                               decode_interval=32))):
        twin = observed.fork(policy)
        if policy.evicts:
            twin.evict()
        started = time.perf_counter()
        decode_greedy(model, twin, last, steps - 1)
        seconds = time.perf_counter() - started
        out[label] = {"s_per_token": seconds / steps, "kv_bytes": twin.nbytes(), "full_kv_bytes": twin.full_nbytes()}
        if policy.evicts:
            out[label]["compression_ratio"] = float(achieved_ratio(twin)[0])
        del twin
    return out


def plot(name: str, prompt_tokens: int, T: float, stats: dict, out: str) -> None:
    title = f"FastGen {name}, {prompt_tokens}-token prompt\nT={T}, ratio {stats['compression_ratio']:.3f}"
    plot_heads(stats["grid"], Path(out) / f"heads_{name.replace('/', '_')}_T{T}.png", title)


def run_model(name: str, args) -> dict:
    model, tok = kvevict.load_model(name)
    started = time.perf_counter()
    token_kinds(tok)  # once per tokenizer (cached): kept out of the prefill timings, reported on its own
    kinds_s = time.perf_counter() - started
    ids, chat = prompt_ids(tok, haystack(tok, args.tokens))
    # the prompt's last token is fed with the decoding, so the prefill covers ids[:, :-1]
    prompt, last = ids[:, :-1], ids[:, -1:]
    n = prompt.shape[1]
    timed_prefill(model, kvevict.EvictingCache(model, kvevict.make_policy("full")), prompt[:, :64])  # warm-up
    full_times = [timed_prefill(model, kvevict.EvictingCache(model, kvevict.make_policy("full")), prompt)
                  for _ in range(args.repeats)]
    result = {"model": name, "prompt_tokens": n, "chat_template": chat, "prefill_full_s": min(full_times),
              "prefill_full_all_s": full_times, "token_kinds_s": kinds_s, "modes": {}}
    for mode, window in (("every row", None), (f"last {args.window} rows", args.window)):
        fastgen = kvevict.make_policy("fastgen", profile_window=window)
        recorder = AttentionRecorder()
        observer = ObserverSet([fastgen, recorder])
        observed_times, profile_times = [], []
        for _ in range(args.repeats):  # the last observed cache is the one used below
            observed = kvevict.EvictingCache(model, observer, tokenizer=tok)
            observed_times.append(timed_prefill(model, observed, prompt))
            profile_times.append(observed.state.member_like(fastgen).profile_seconds)
        observed_s = min(observed_times)
        entry = {"profile_window": window, "prefill_observed_s": observed_s, "profile_s": min(profile_times),
                 "prefill_observed_all_s": observed_times, "profile_all_s": profile_times,
                 "profile_pct_of_prefill": 100.0 * min(profile_times) / result["prefill_full_s"],
                 "thresholds": {}}
        twins = {}
        for T in args.thresholds:
            twin = observed.fork(kvevict.make_policy("fastgen", recovery=T, profile_window=window))
            twin.evict()
            twins[T] = twin
            stats = summarize(twin)
            entry["thresholds"][str(T)] = stats
            if window is None:
                plot(name, n, T, stats, args.out)
        if window is None and args.decode_steps:
            entry["decode"] = decode_timing(model, observed, last, args.decode_steps, 0.95)
        if args.continuation:
            recorder_member = observed.state.member_like(recorder)
            recorder_member.recording = True
            started = time.perf_counter()
            decode_greedy(model, observed, last, args.continuation)
            entry["decode_s"] = time.perf_counter() - started
            for T, twin in twins.items():
                held = held_out_recovery(recorder_member, twin, n)
                stats = entry["thresholds"][str(T)]
                stats["held_out_recovery_mean"] = float(held.mean())
                stats["held_out_recovery_min"] = float(held.min())
                stats["held_out_heads_at_T"] = float((held >= T).float().mean())
        for stats in entry["thresholds"].values():
            stats.pop("layers")
        result["modes"][mode] = entry
        del observed, twins
    return result


def markdown(results: list[dict], args) -> str:
    lines = [
        "# FastGen head profiles",
        "",
        f"Prompt: `kvevict.data.haystack(tok, {args.tokens})` through the chat template when the tokenizer has one; "
        f"batch 1, fp32, CPU, {args.threads} thread(s). Ratio = fraction of (evictable layer, KV head, token) "
        "entries removed at the end of prefill (cache kept counts). Recovery (profile) = recovery of the chosen "
        f"policy on the profiled prompt rows. Held-out = 1 - attention of the next {args.continuation} greedily "
        "decoded queries (full cache) on the prompt keys the head dropped.",
        "",
        "| model | profiled rows | T | " + " | ".join(CANDIDATES) + " | ratio | recovery mean / min (profile) "
        "| held-out mean / min | heads >= T held-out |",
        "|---|---|---|" + "---|" * len(CANDIDATES) + "---|---|---|---|",
    ]
    for result in results:
        for mode, entry in result["modes"].items():
            for T, s in entry["thresholds"].items():
                fractions = " | ".join(f"{100 * s['fractions'][c]:.1f}%" for c in CANDIDATES)
                held = "- | -"
                if "held_out_recovery_mean" in s:
                    held = (f"{s['held_out_recovery_mean']:.4f} / {s['held_out_recovery_min']:.4f} | "
                            f"{100 * s['held_out_heads_at_T']:.1f}%")
                lines.append(f"| {result['model']} | {mode} ({s['profiled_rows']}) | {T} | {fractions} | "
                             f"{s['compression_ratio']:.4f} | {s['recovery_mean']:.4f} / {s['recovery_min']:.4f} | "
                             f"{held} |")
    lines += [
        "",
        "Timing: prefill with the full cache vs the same prefill with FastGen observing (profiling runs inside the "
        "attention calls); token kinds (decoding the vocabulary, once per tokenizer) are computed beforehand.",
        "",
        "| model | prompt tokens | token kinds (s) | prefill, full cache (s) | profiled rows | "
        "prefill + profiling (s) | profiling (s) | profiling / full prefill |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for result in results:
        for mode, entry in result["modes"].items():
            lines.append(f"| {result['model']} | {result['prompt_tokens']} | {result['token_kinds_s']:.2f} | "
                         f"{result['prefill_full_s']:.2f} | {mode} | {entry['prefill_observed_s']:.2f} | "
                         f"{entry['profile_s']:.2f} | {entry['profile_pct_of_prefill']:.1f}% |")
    lines += [
        "",
        f"Decoding {args.decode_steps} greedy tokens after the prompt (T = 0.95, every-row profile), each setting on "
        "a copy of the observed prefill. KV bytes count allocated rows (free decode rows included), per-row "
        "metadata and the copy's own side channels (FastGen: token kind and cumulative attention; full: none).",
        "",
        "| model | setting | ms per token | KV bytes after decoding | ratio after decoding |",
        "|---|---|---|---|---|",
    ]
    for result in results:
        for entry in result["modes"].values():
            for label, d in entry.get("decode", {}).items():
                ratio = f"{d['compression_ratio']:.4f}" if "compression_ratio" in d else "0"
                lines.append(f"| {result['model']} | {label} | {1000 * d['s_per_token']:.1f} | "
                             f"{d['kv_bytes'] / 2**20:.2f} MiB of {d['full_kv_bytes'] / 2**20:.2f} MiB | {ratio} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=["smollm2-135m", "gemma3-270m"])
    parser.add_argument("--tokens", type=int, default=4000, help="essay tokens in the prompt")
    parser.add_argument("--thresholds", type=float, nargs="+", default=[0.91, 0.95, 0.98])
    parser.add_argument("--window", type=int, default=256, help="rows read in the windowed profiling mode")
    parser.add_argument("--continuation", type=int, default=64, help="decoded tokens for the held-out recovery")
    parser.add_argument("--decode-steps", type=int, default=32, help="decoded tokens timed per decode setting")
    parser.add_argument("--repeats", type=int, default=1, help="timed prefills per setting (the fastest is reported)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1 keeps timings stable on a shared CPU)")
    parser.add_argument("--out", default="results/fastgen")
    parser.add_argument("--plot-only", action="store_true", help="redraw the heat maps from --out/profile.json")
    args = parser.parse_args()
    if args.plot_only:
        for result in json.loads((Path(args.out) / "profile.json").read_text())["results"]:
            for T, stats in result["modes"]["every row"]["thresholds"].items():
                plot(result["model"], result["prompt_tokens"], float(T), stats, args.out)
        return
    torch.set_num_threads(args.threads)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    results = []
    for name in args.models:
        started = time.perf_counter()
        results.append(run_model(name, args))
        print(f"{name}: done in {time.perf_counter() - started:.0f} s", flush=True)
    meta = {"tokens": args.tokens, "thresholds": args.thresholds, "window": args.window,
            "continuation": args.continuation, "threads": args.threads, "torch": torch.__version__,
            "machine": platform.machine(), "processor": platform.processor()}
    (Path(args.out) / "profile.json").write_text(json.dumps({"settings": meta, "results": results}, indent=1))
    table = markdown(results, args)
    (Path(args.out) / "profile.md").write_text(table)
    print(table)


if __name__ == "__main__":
    main()
