"""Smoke test of benchmarks/chunked_ce.py at a tiny size (no timing asserted)."""

import json

import pytest

from benchmarks import chunked_ce


def test_chunked_ce_benchmark_smoke(tmp_path):
    out = tmp_path / "chunked_ce.json"
    result = chunked_ce.main(["--quick", "--out", str(out)])
    assert json.loads(out.read_text()) == result
    assert set(result["chunks"]) == {"0", "16", "48"}
    for row in result["chunks"].values():
        assert row["temp"] > 0 and row["peak_estimate"] > row["temp"] and row["step_seconds"]["median"] > 0
        assert row["loss"] == pytest.approx(result["chunks"]["0"]["loss"], rel=1e-5)
