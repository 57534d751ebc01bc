"""Smoke test of benchmarks/weight_gradients.py at a tiny size (no timing asserted): the trainer's step with each
form of the weight gradients compiles, runs and trains the same first step, and each product is timed both ways."""

import pytest

from benchmarks import weight_gradients
from step_forms_results import check_compare_result


def test_weight_gradients_smoke(tmp_path):
    out = tmp_path / "weight_gradients.json"
    result = weight_gradients.main(["--quick", "--out", str(out)])
    check_compare_result(result, out, {"transposed", "plain"})
    first = result["first_step"]
    assert first["transposed"]["loss"] == pytest.approx(first["plain"]["loss"], rel=1e-6)
    assert first["transposed"]["grad_norm"] == pytest.approx(first["plain"]["grad_norm"], rel=1e-5)
    assert [p["shape"] for p in result["products_ms"]] == [list(s) for s in weight_gradients.QUICK_SHAPES]
    assert all(p["plain"] > 0 and p["transposed"] > 0 for p in result["products_ms"])
