"""Smoke test of benchmarks/remat.py at a tiny size (no timing asserted)."""

import json

from benchmarks import remat


def test_remat_benchmark_smoke(tmp_path):
    out = tmp_path / "remat.json"
    result = remat.main(["--quick", "--repeats", "1", "--steps", "1", "--out", str(out)])
    assert json.loads(out.read_text()) == result
    assert set(result["policies"]) == {"none", "full", "dots"}
    for row in result["policies"].values():
        assert row["temp"] > 0 and row["peak_estimate"] > row["temp"] and row["step_seconds"]["median"] > 0
