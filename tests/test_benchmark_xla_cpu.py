"""Smoke test of benchmarks/xla_cpu.py at a tiny size: phases of both frameworks, the traced step's kernels
grouped with their FLOP/s, and a flag sweep in child processes (no timing asserted)."""

import json

import pytest

pytest.importorskip("torch")

from benchmarks import xla_cpu  # noqa: E402


def test_xla_cpu_benchmark_smoke(tmp_path):
    out = tmp_path / "xla_cpu.json"
    result = xla_cpu.main(["--quick", "--repeats", "1", "--trace_steps", "1", "--flag_rounds", "1",
                           "--flag_steps", "1", "--flag_sets", "fast_math", "--out", str(out)])
    assert json.loads(out.read_text()) == result
    for phase in ("forward", "forward_backward", "adamw", "step"):
        row = result["phases"]["ms"][phase]
        assert row["jax"] > 0 and row["torch"] > 0 and row["jax_over_torch"] > 0
    kernels = result["kernels"]
    assert {"MLP", "output head", "attention projections", "attention scores and values"} <= set(kernels)
    assert all(kernels[group]["gflop_per_second"] > 0 for group in ("MLP", "output head"))
    assert sum(group["share"] for group in kernels.values()) == pytest.approx(1.0, abs=1e-3)
    assert set(result["flags"]) == {"default", "fast_math"} and result["flags"]["default"]["over_default"] == 1.0
