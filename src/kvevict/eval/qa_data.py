"""Real QA passages for the multi-document QA task: the `disfl_qa` task of BIG-bench (SQuAD passages with
disfluent questions; Gupta et al., "Disfl-QA", arXiv 2106.04016), shipped in the `bigbench` PyPI sdist.

The sdist is large (358 MB), so it is not a dependency: the first QA run downloads it once, keeps only the
task's JSON under the data cache, and deletes the archive.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

BIGBENCH = "bigbench==1.0.0"
MEMBER = "bigbench-1.0.0/bigbench/benchmark_tasks/disfl_qa/task.json"


def data_dir() -> Path:
    return Path(os.environ.get("KVEVICT_DATA", Path.home() / ".cache" / "kvevict" / "data"))


def pool_path() -> Path:
    return data_dir() / "disfl_qa.json"


def parse_disfl_qa(task: dict) -> list[dict]:
    """BIG-bench examples ("<question>\\ncontext: <passage>" -> target) as {passage, question, answers};
    unanswerable ones (target "unknown") are left out."""
    pool = []
    for example in task["examples"]:
        question, _, passage = example["input"].partition("\ncontext:")
        target = str(example["target"]).strip()
        if not passage.strip() or not target or target.lower() == "unknown":
            continue
        pool.append({"passage": passage.strip(), "question": question.strip(), "answers": [target]})
    return pool


def load_qa_pool(download: bool = False) -> list[dict]:
    """The QA pool from the data cache; with download=True fetch it first if missing (clear error otherwise)."""
    path = pool_path()
    if not path.is_file():
        if not download:
            raise FileNotFoundError(
                f"the qa task needs the disfl_qa passages ({path} is missing); `kvevict eval --tasks qa` downloads "
                f"them once (the {BIGBENCH} sdist, 358 MB), or run: python -m kvevict.eval.qa_data"
            )
        fetch_disfl_qa()
    return json.loads(path.read_text())


def fetch_disfl_qa() -> Path:
    """Download the bigbench sdist, extract the disfl_qa task, store the parsed pool, delete the archive."""
    print(f"the qa task needs real QA passages: downloading {BIGBENCH} (358 MB, once) for its disfl_qa task ...",
          file=sys.stderr, flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
                        "-q", "-d", tmp, BIGBENCH], check=True)
        archive = next(Path(tmp).glob("bigbench-*.tar.gz"))
        with tarfile.open(archive) as tar:
            task = json.load(tar.extractfile(MEMBER))
    pool = parse_disfl_qa(task)
    path = pool_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(pool))
    print(f"stored {len(pool)} QA examples in {path}", file=sys.stderr)
    return path


if __name__ == "__main__":
    fetch_disfl_qa()
