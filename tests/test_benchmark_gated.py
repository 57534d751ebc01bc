"""Smoke test of benchmarks/gated.py at a tiny size (no timing asserted): both forms of the MLP's activation
compile and run in the trainer's step, train the same first step, and the rematerialised one plans less scratch."""

import json

import pytest

from benchmarks import gated


def test_gated_smoke(tmp_path):
    out = tmp_path / "gated.json"
    result = gated.main(["--quick", "--out", str(out)])
    assert json.loads(out.read_text()) == result
    assert set(result["ms_per_step"]) == set(gated.SIDES) and all(v > 0 for v in result["ms_per_step"].values())
    assert len(result["speedup_per_round"]) == result["rounds"] == 2 and result["speedup_paired_median"] > 0
    first = result["first_step"]
    assert first["rematerialised"]["loss"] == pytest.approx(first["as_written"]["loss"], rel=1e-6)
    assert first["rematerialised"]["grad_norm"] == pytest.approx(first["as_written"]["grad_norm"], rel=1e-5)
    assert result["scratch_mib"]["rematerialised"] < result["scratch_mib"]["as_written"]
