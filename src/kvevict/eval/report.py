"""Summary table (Markdown) and score-vs-ratio plot of an evaluation sweep."""

from __future__ import annotations

from pathlib import Path

SCORE_NAMES = {"fidelity": "top-1 agreement %", "longgen": "prefix agreement %"}


def _policies(summaries: list[dict]) -> list[str]:
    names = []
    for s in summaries:
        if s["policy"] != "full" and s["policy"] not in names:
            names.append(s["policy"])
    return names or ["full"]


def _score(summaries, task, policy, ratio):
    for s in summaries:
        if s["task"] == task and ((ratio == 0 and s["policy"] == "full") or (s["policy"] == policy and s["ratio"] == ratio)):
            return s
    return None


def summary_table(summaries: list[dict], cfg) -> str:
    """policy x ratio -> score per task and the average over tasks (ratio 0 is the shared full-cache run)."""
    tasks = list(dict.fromkeys(s["task"] for s in summaries))
    ratios = sorted({s["ratio"] for s in summaries})
    lines = [
        f"# {cfg.model}: {cfg.context_length}-token contexts, {cfg.samples} samples per task, seed {cfg.seed}, "
        f"{'query-aware' if cfg.query_aware else 'query-agnostic'}, {cfg.dtype}",
        "",
        "Scores in %: RULER substring match for QA tasks, " + ", ".join(f"{t}: {n}" for t, n in SCORE_NAMES.items())
        + ". `kv` = KV bytes kept / unevicted (mean).",
        "",
        "| policy | ratio | " + " | ".join(tasks) + " | average | kv |",
        "|---|---:|" + "---:|" * len(tasks) + "---:|---:|",
    ]
    rows = [("full", 0.0)] if 0.0 in ratios else []
    rows += [(policy, ratio) for policy in _policies(summaries) for ratio in ratios if ratio > 0]
    for policy, ratio in rows:
        cells = [_score(summaries, t, policy, ratio) for t in tasks]
        if all(c is None for c in cells):
            continue
        scores = [c["score"] for c in cells if c is not None]
        kv = [c["kv_fraction"] for c in cells if c is not None]
        row = [f"{c['score']:.1f}" if c else "" for c in cells]
        lines.append(f"| {policy} | {ratio:g} | " + " | ".join(row)
                     + f" | {sum(scores) / len(scores):.1f} | {sum(kv) / len(kv):.2f} |")
    extra = [s for s in summaries if s["task"] == "fidelity"]
    if extra:
        lines += ["", "Fidelity details (mean KL nats, perplexity ratio):", "",
                  "| policy | ratio | KL | ppl ratio |", "|---|---:|---:|---:|"]
        for s in sorted(extra, key=lambda s: (s["policy"] != "full", s["policy"], s["ratio"])):
            lines.append(f"| {s['policy']} | {s['ratio']:g} | {s.get('mean_kl', 0):.4f} | {s.get('mean_ppl_ratio', 1):.3f} |")
    return "\n".join(lines) + "\n"


def plot_scores(summaries: list[dict], cfg, path: Path) -> None:
    """One panel per task, one line per policy: score against compression ratio."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = list(dict.fromkeys(s["task"] for s in summaries))
    ratios = sorted({s["ratio"] for s in summaries})
    cols = min(3, len(tasks))
    rows = -(-len(tasks) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.4 * rows), squeeze=False)
    for ax, task in zip(axes.flat, tasks):
        for policy in _policies(summaries):
            points = [(r, _score(summaries, task, policy, r)) for r in ratios]
            points = [(r, s["score"]) for r, s in points if s is not None]
            if points:
                ax.plot(*zip(*points), marker="o", label=policy)
        ax.set_title(task)
        ax.set_xlabel("compression ratio (fraction evicted)")
        ax.set_ylabel(SCORE_NAMES.get(task, "score %"))
        ax.set_ylim(-2, 102)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(tasks):]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=8)
    fig.suptitle(f"{cfg.model}, {cfg.context_length} tokens, {cfg.samples} samples/task")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
