"""Smoke test of benchmarks/maxima.py at a tiny size (no timing asserted): the trainer's step with each shift
compiles, runs and trains the same first step to the bit, and the reduction is timed each way."""

from benchmarks import maxima
from step_forms_results import check_compare_result


def test_maxima_smoke(tmp_path):
    out = tmp_path / "maxima.json"
    result = maxima.main(["--quick", "--out", str(out)])
    check_compare_result(result, out, {"shift_max", "jnp_max"})
    assert result["first_step"]["shift_max"] == result["first_step"]["jnp_max"]
    assert set(result["reduction_ms"]) == {"shape", "jnp_max", "shift_max", "sum"}
