"""What a newcomer copies from README.md runs: every Python block is executed."""

import re
from pathlib import Path

import pytest

from kvevict.compat import CACHE_ARG

README = Path(__file__).resolve().parents[1] / "README.md"
BLOCKS = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def test_readme_has_python_blocks():
    assert BLOCKS


@pytest.mark.parametrize("block", [
    pytest.param(block, id=f"block{number + 1}", marks=[pytest.mark.slow] if "load_model(" in block else [])
    for number, block in enumerate(BLOCKS)
])
def test_readme_python_block_runs(block):
    # the README shows transformers' current argument name and says which name older releases take
    code = block.replace("cache=cache", f"{CACHE_ARG}=cache")
    exec(compile(code, "README.md", "exec"), {"__name__": "readme"})
