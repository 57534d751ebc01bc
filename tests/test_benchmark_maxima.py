"""Smoke test of benchmarks/maxima.py at a tiny size (no timing asserted): the trainer's step with each shift
compiles, runs and trains the same first step to the bit, and the reduction is timed each way."""

import json

from benchmarks import maxima


def test_maxima_smoke(tmp_path):
    out = tmp_path / "maxima.json"
    result = maxima.main(["--quick", "--out", str(out)])
    assert json.loads(out.read_text()) == result
    assert set(result["ms_per_step"]) == {"shift_max", "jnp_max"} and all(v > 0 for v in result["ms_per_step"].values())
    assert len(result["speedup_per_round"]) == result["rounds"] == 2 and result["speedup_paired_median"] > 0
    assert result["first_step"]["shift_max"] == result["first_step"]["jnp_max"]
    assert set(result["reduction_ms"]) == {"shape", "jnp_max", "shift_max", "sum"}
