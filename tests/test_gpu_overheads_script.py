"""benchmarks/gpu_overheads.py, the script prepared for a GPU session, runs end to end (small, on CPU)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_overheads.py"


def test_every_row_is_measured_and_consistent(tmp_path):
    out = tmp_path / "overheads.json"
    subprocess.run([sys.executable, str(SCRIPT), "--device", "cpu", "--tiny", "--context", "160", "--decode-tokens",
                    "2", "--repeats", "1", "--out", str(out)], check=True, capture_output=True, timeout=600)
    result = json.loads(out.read_text())
    rows = result["rows"]
    assert [r["row"] for r in rows] == ["fastgen", "kvzip", "fastkvzip", "decode", "decode", "attention-gate"]
    for r in rows[:3]:
        assert r["ratio"] == pytest.approx(r["policy_s"] / r["plain_s"])
    for r in rows[3:5]:
        allocation = r["what"].split(" with ")[1].split()[0]
        assert r["ratio"] == pytest.approx(r["tok_per_s"][allocation] / r["tok_per_s"]["uniform"])
    ms = rows[5]["ms_per_token"]
    assert rows[5]["ratio"] == pytest.approx(ms["attention-gate"] / ms["full"])
    assert result["context"] == 160 and result["machine"]["device"] == "cpu"
