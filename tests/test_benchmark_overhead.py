"""Smoke test of benchmarks/overhead.py at a tiny size: speed alternated in one process, compile time and
peak RSS from each side alone in a child process (no timing asserted)."""

import json

import numpy as np
import pytest

from benchmarks import overhead


def test_overhead_benchmark_smoke(tmp_path):
    out = tmp_path / "overhead.json"
    result = overhead.main(["--quick", "--steps_per_round", "2", "--repeats", "1", "--out", str(out)])
    assert json.loads(out.read_text()) == result
    assert result["trainer_tokens_per_second"] > 0 and result["loop_tokens_per_second"] > 0
    assert len(result["ratio_trainer_over_loop_per_round"]) == result["rounds"]
    assert all(r > 0 for r in result["ratio_trainer_over_loop_per_round"])
    rounds = sorted(result["ratio_trainer_over_loop_per_round"])
    assert rounds[0] <= result["ratio_trainer_over_loop_paired_median"] <= rounds[-1]
    assert result["ratio_trainer_over_loop_paired_mean"] == pytest.approx(sum(rounds) / len(rounds), abs=1e-4)
    assert result["ratio_trainer_over_loop_paired_standard_error"] >= 0
    for side in ("trainer", "loop"):
        assert len(result[f"{side}_compile_seconds"]) == 1 and result[f"{side}_compile_seconds"][0] > 0
        assert result[f"{side}_peak_rss_mib"][0] > 100
        assert result[f"{side}_first_step_ready_seconds"][0] >= result[f"{side}_compile_seconds"][0]  # rounded to ms
    assert result["ratio_compile_trainer_over_loop"] > 0 and result["ratio_peak_rss_trainer_over_loop"] > 0
    assert result["trainer_added_rss_mib"][0] > 0 and result["ratio_added_rss_trainer_over_loop"] > 0
    planned = result["trainer_planned_memory_mib"], result["loop_planned_memory_mib"]
    assert min(planned) > 0
    assert result["ratio_planned_memory_trainer_over_loop"] == pytest.approx(planned[0] / planned[1], rel=0.02)


def test_standard_error_of_the_paired_ratios():
    values = [0.93, 1.01, 0.97, 1.04]
    assert overhead.standard_error(values) == pytest.approx(np.std(values, ddof=1) / np.sqrt(len(values)))
    assert overhead.standard_error([0.97]) == 0.0
