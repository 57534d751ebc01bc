"""Smoke test of benchmarks/drift.py on the tiny Llama (no timing asserted), and its slope against NumPy's fit."""

import json

import numpy as np
import pytest

from benchmarks import drift, headlines


@pytest.mark.usefixtures("collections_of_this_test")  # its gc.collect calls: this test's objects
def test_drift_benchmark_smoke(tmp_path):
    out = tmp_path / "drift.json"
    # The tiny Llama of --quick, cut to 20 steps: evaluated and saved every 8, logged every 4: five logs (each
    # collects garbage and counts the test process's objects, seconds in a long test process), one in the second
    # quarter (8) and one in the fourth (16).
    result = drift.main(["--quick", "--steps", "20", "--logging_steps", "4", "--every", "8", "--out", str(out)])
    assert json.loads(out.read_text()) == result
    assert result["steps"] == 20 and result["logging_steps"] == 4 and result["eval_and_save_every"] == 8
    assert [s["step"] for s in result["samples"]] == list(range(4, 21, 4))
    assert result["mean_ms_per_step"] > 0 and result["ratio_fourth_over_second_quarter"] > 0
    for name in drift.RESOURCES:  # the floors are rounded to 0.001: 1000 * 0.001 / 10 = 0.1 per 1000 steps
        floors = result[name]
        assert floors["growth_per_1000_steps"] == pytest.approx(
            1000 * (floors["fourth_quarter_floor"] - floors["second_quarter_floor"]) / 10, abs=0.101)
    rows = headlines.drift(result)
    assert rows[0].value == result["ratio_fourth_over_second_quarter"]
    assert rows[2].value == result["live_array_mib"]["growth_per_1000_steps"]


def test_quick_sizes_are_the_documented_smoke_run_and_the_defaults_stay():
    """--quick alone is docs/benchmarks.md's smoke run (120 steps, logged every 5, evaluated and saved every 20);
    the sizes given on the command line win over it, and without it the measurement's defaults hold."""
    seen = []
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(drift, "build_trainer", lambda *args, **kwargs: seen.append((args, kwargs)) or Stop())
        for argv in (["--quick"], [], ["--quick", "--steps", "8"]):
            with pytest.raises(Stopped):
                drift.main(argv)
    assert [(args[2], args[3], kwargs["eval_steps"]) for args, kwargs in seen] == [(120, 5, 20), (500, 10, 50),
                                                                                  (8, 5, 20)]


class Stopped(Exception):
    pass


class Stop:
    def train(self):
        raise Stopped


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
