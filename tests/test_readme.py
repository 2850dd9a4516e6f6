"""What a newcomer copies from README.md runs: every Python block is executed, and the "Serve" section's commands
run against the server its own command line starts."""

import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from kvevict.compat import CACHE_ARG

README = Path(__file__).resolve().parents[1] / "README.md"
TEXT = README.read_text()
BLOCKS = re.findall(r"```python\n(.*?)```", TEXT, flags=re.S)
BASH = re.findall(r"```bash\n(.*?)```", TEXT, flags=re.S)
SERVER_URL = "http://127.0.0.1:8000"


def test_readme_has_python_blocks():
    assert BLOCKS


@pytest.fixture(scope="module")
def readme_server():
    """The README's `kvevict serve` command, on a free port instead of 8000."""
    pytest.importorskip("fastapi")
    from kvevict.serve.loadgen import wait_until_healthy

    line = next(line for block in BASH for line in block.splitlines() if line.startswith("kvevict serve "))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    args = [a if a != "8000" else str(port) for a in shlex.split(line)[1:]]
    proc = subprocess.Popen([sys.executable, "-m", "kvevict.cli", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    if not wait_until_healthy(url, proc, timeout=300):
        proc.kill()
        raise RuntimeError(f"the README's server did not start: {proc.stdout.read()[-3000:]}")
    yield url
    proc.send_signal(signal.SIGINT)
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()


def _marks(block):
    return [pytest.mark.slow] if "load_model(" in block or SERVER_URL in block else []


@pytest.mark.parametrize("block", [pytest.param(block, id=f"block{number + 1}", marks=_marks(block))
                                   for number, block in enumerate(BLOCKS)])
def test_readme_python_block_runs(block, request):
    # the README shows transformers' current argument name and says which name older releases take
    code = block.replace("cache=cache", f"{CACHE_ARG}=cache")
    if SERVER_URL in code:
        code = code.replace(SERVER_URL, request.getfixturevalue("readme_server"))
    exec(compile(code, "README.md", "exec"), {"__name__": "readme"})


@pytest.mark.slow
def test_readme_curl_command_gets_a_completion(readme_server):
    if shutil.which("curl") is None:
        pytest.skip("curl is not installed")
    block = next(block for block in BASH if block.startswith("curl ") and SERVER_URL in block)
    out = subprocess.run(block.replace(SERVER_URL, readme_server), shell=True, capture_output=True, text=True,
                         timeout=300, check=True)
    assert '"text_completion"' in out.stdout.replace(" ", "") and '"finish_reason"' in out.stdout
