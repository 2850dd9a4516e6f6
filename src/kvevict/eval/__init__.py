"""Evaluation harness: long-context tasks, fidelity metrics, sweeps over policies and ratios, reports, plots."""

from .runner import EvalConfig, run_eval
from .tasks import TASKS, make_samples

__all__ = ["EvalConfig", "TASKS", "make_samples", "run_eval"]
