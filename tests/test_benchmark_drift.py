"""Smoke test of benchmarks/drift.py on the tiny Llama (no timing asserted), and its slope against NumPy's fit."""

import json

import numpy as np
import pytest

from benchmarks import drift, headlines


def test_drift_benchmark_smoke(tmp_path):
    out = tmp_path / "drift.json"
    result = drift.main(["--quick", "--out", str(out)])
    assert json.loads(out.read_text()) == result
    assert result["steps"] == 120 and result["eval_and_save_every"] == 20
    assert [s["step"] for s in result["samples"]] == list(range(5, 121, 5))
    assert result["mean_ms_per_step"] > 0 and result["ratio_fourth_over_second_quarter"] > 0
    for name in drift.RESOURCES:
        floors = result[name]
        assert floors["growth_per_1000_steps"] == pytest.approx(
            1000 * (floors["fourth_quarter_floor"] - floors["second_quarter_floor"]) / 60, abs=0.05)
    rows = headlines.drift(result)
    assert rows[0].value == result["ratio_fourth_over_second_quarter"]
    assert rows[2].value == result["live_array_mib"]["growth_per_1000_steps"]


def test_slope_and_its_standard_error_match_numpys_fit():
    rng = np.random.default_rng(0)
    xs = np.arange(40.0)
    ys = 0.3 * xs + 2 + rng.normal(0, 0.5, xs.size)
    slope, _ = np.polyfit(xs, ys, 1)
    fitted, error = drift.fit_slope(xs, ys)
    residuals = ys - np.polyval(np.polyfit(xs, ys, 1), xs)
    expected_error = np.sqrt(np.sum(residuals ** 2) / (xs.size - 2) / np.sum((xs - xs.mean()) ** 2))
    assert fitted == pytest.approx(slope, rel=1e-12) and error == pytest.approx(expected_error, rel=1e-9)
    assert drift.fit_slope([0, 1], [1, 3]) == (2.0, 0.0)


def test_quarters_leave_out_the_runs_last_log():
    samples = [drift.Sample(step, 0.1, 1, 1.0, 1, 1.0, 1) for step in range(10, 101, 10)]
    assert [s.step for s in drift.quarter(samples, 100, 1)] == [30, 40, 50]
    assert [s.step for s in drift.quarter(samples, 100, 3)] == [80, 90]
    with pytest.raises(ValueError, match="--logging_steps"):
        drift.summarise(samples[:2], 100)
