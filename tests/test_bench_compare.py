"""`kvevict bench --compare`: every row measured in one process, ratios consistent with the seconds, JSON written."""

import json

import pytest

from kvevict.bench.compare import ROWS, CompareSpec, compare, format_table
from kvevict.policies import make_policy

@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:.*protected tokens.*:UserWarning")
def test_every_row_is_a_ratio_of_its_own_two_timings(tmp_path):
    spec = CompareSpec(model="smollm2-135m", context=192, dtype="float32", threads=1, repeats=1, decode_tokens=3)
    out = tmp_path / "compare.json"
    result = compare(spec, out)
    assert json.loads(out.read_text()) == json.loads(json.dumps(result))
    rows = result["rows"]
    assert {r["row"] for r in rows} == set(ROWS)
    # fastgen: the default window and every row (profile_window=None; one row when the default is every row);
    # fastkvzip and kvzip: the gates / scores in the model's precision and in float32; decode: head and global vs
    # uniform
    windows = {r["profile_window"] for r in rows if r["row"] == "fastgen"}
    assert windows == {make_policy("fastgen").profile_window, None}
    assert [r["row"] for r in rows].count("decode") == 2
    assert [r["gate_precision"] for r in rows if r["row"] == "fastkvzip"] == ["model", "float32"]
    assert [r["score_precision"] for r in rows if r["row"] == "kvzip"] == ["model", "float32"]
    for r in rows:
        assert r["plain_s"] > 0 and r["overhead_s"] > 0
        if r["row"] == "decode":  # tok/s ratio: the inverse of the seconds-per-token ratio
            assert r["ratio"] == pytest.approx(r["plain_s"] / r["overhead_s"])
            allocation = r["what"].split(" with ")[1].split()[0]
            assert r["ratio"] == pytest.approx(r["tok_per_s"][allocation] / r["tok_per_s"]["uniform"])
            # the same ratio keeps the same number of entries whatever the allocation: memory freed per head too
            assert r["kv_bytes"][allocation] <= 1.25 * r["kv_bytes"]["uniform"]
        else:
            assert r["ratio"] == pytest.approx(r["overhead_s"] / r["plain_s"])
    table = format_table(result)
    assert table.count("\n| ") == len(rows) + 1  # header + one line per row
    assert "model=smollm2-135m context=192" in table


def test_bad_specs_are_refused_before_any_model_loads():
    with pytest.raises(ValueError, match="unknown or no rows \\['speed'\\]"):
        CompareSpec(rows=["kvzip", "speed"])
    with pytest.raises(ValueError, match="no rows"):
        CompareSpec(rows=[])
    with pytest.raises(ValueError, match="repeats must be >= 1"):
        CompareSpec(repeats=0)
