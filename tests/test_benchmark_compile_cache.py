"""Smoke test of benchmarks/compile_cache.py at its quick size (no timing asserted)."""

import json

from benchmarks import compile_cache


def test_compile_cache_benchmark_smoke(tmp_path):
    out = tmp_path / "compile_cache.json"
    result = compile_cache.main(["--quick", "--out", str(out)])
    assert json.loads(out.read_text()) == result
    assert set(result["first_step_compile_seconds"]) == {"off", "cold", "warm"}
    assert all(seconds > 0 for values in result["first_step_compile_seconds"].values() for seconds in values)
    assert result["warm_over_off"] > 0 and result["cold_over_off"] > 0
