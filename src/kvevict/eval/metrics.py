"""Scores: RULER's substring match for QA-style tasks; KL / top-1 / perplexity for fidelity; agreement for longgen."""

from __future__ import annotations

import math

import torch


def string_match(prediction: str, references: list[str], match: str) -> float:
    """Case-insensitive substring match (RULER). "all": fraction of references found; "any": 1 if one is found."""
    pred = prediction.lower()
    found = [ref.lower() in pred for ref in references]
    if not found:
        return 0.0
    if match == "all":
        return sum(found) / len(found)
    if match == "any":
        return float(any(found))
    raise ValueError(f"match must be 'all' or 'any', got {match!r}")


def fidelity_metrics(full_logits: torch.Tensor, logits: torch.Tensor, targets: torch.Tensor) -> dict:
    """Next-token fidelity of a compressed cache against the full one, on teacher-forced targets [N].

    kl: mean KL(full || compressed) in nats; top1: fraction of positions whose argmax agrees;
    ppl_ratio: perplexity of the targets under the compressed cache / under the full cache.
    """
    full_lp = torch.log_softmax(full_logits.float(), dim=-1)
    lp = torch.log_softmax(logits.float(), dim=-1)
    kl = (full_lp.exp() * (full_lp - lp)).sum(-1).mean().item()
    top1 = (full_lp.argmax(-1) == lp.argmax(-1)).float().mean().item()
    nll_full = -full_lp.gather(-1, targets.view(-1, 1)).mean().item()
    nll = -lp.gather(-1, targets.view(-1, 1)).mean().item()
    return {"kl": kl, "top1": top1, "ppl_ratio": math.exp(nll - nll_full), "ppl": math.exp(nll), "ppl_full": math.exp(nll_full)}


def generation_agreement(reference: list[int], generated: list[int]) -> dict:
    """prefix: fraction of tokens before the first divergence; tokens: fraction of equal positions."""
    n = max(len(reference), 1)
    prefix = 0
    for a, b in zip(reference, generated):
        if a != b:
            break
        prefix += 1
    same = sum(a == b for a, b in zip(reference, generated))
    return {"prefix_agreement": prefix / n, "token_agreement": same / n}


# Which number summarises a task in tables and plots (all in percent).
def primary_score(task: str, metrics: dict) -> float:
    if task == "fidelity":
        return 100.0 * metrics["top1"]
    if task == "longgen":
        return 100.0 * metrics["prefix_agreement"]
    return 100.0 * metrics["score"]
