"""Smoke test of benchmarks/gated.py at a tiny size (no timing asserted): both forms of the MLP's activation
compile and run in the trainer's step, train the same first step, and the rematerialised one plans less scratch."""

import pytest

from benchmarks import gated
from step_forms_results import check_compare_result


def test_gated_smoke(tmp_path):
    out = tmp_path / "gated.json"
    result = gated.main(["--quick", "--out", str(out)])
    check_compare_result(result, out, set(gated.SIDES))
    first = result["first_step"]
    assert first["rematerialised"]["loss"] == pytest.approx(first["as_written"]["loss"], rel=1e-6)
    assert first["rematerialised"]["grad_norm"] == pytest.approx(first["as_written"]["grad_norm"], rel=1e-5)
    assert result["scratch_mib"]["rematerialised"] < result["scratch_mib"]["as_written"]
