"""Smoke test of benchmarks/scan.py at a tiny size (no timing asserted)."""

import json

from benchmarks import run, scan


def test_scan_benchmark_smoke(tmp_path):
    out = tmp_path / "scan.json"
    result = scan.main(["--quick", "--depths", "2", "--repeats", "1", "--steps", "1", "--out", str(out)])
    assert json.loads(out.read_text()) == result
    row = result["depths"]["2"]
    for side in ("unrolled", "scan"):
        assert row[side]["first_step_compile_seconds"] > 0 and row[side]["temp"] > 0
        assert row[side]["init_compile_seconds"] > 0
        assert row[side]["step_seconds"]["median"] > 0
    assert set(row["scan_over_unrolled"]) == {"first_step_compile", "init_compile", "step_time", "temp"}
    assert all(h.value is not None for h in run.BENCHMARKS["scan"].headlines(result))
