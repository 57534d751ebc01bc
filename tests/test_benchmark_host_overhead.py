"""Smoke test of benchmarks/host_overhead.py: the trainer's loop against the hand-written one on a tiny model,
and the host cost of each per-step part (no timing asserted)."""

import json

import pytest

from benchmarks import headlines, host_overhead


@pytest.mark.parametrize("size", ["tiny", "small"])
def test_host_overhead_benchmark_smoke(tmp_path, size):
    out = tmp_path / "host_overhead.json"
    result = host_overhead.main(["--quick", "--size", size, "--out", str(out)])
    assert json.loads(out.read_text()) == result
    assert result["size"] == size and result["tokens_per_step"] == 8 * host_overhead.SIZES[size][1]
    assert result["trainer_ms_per_step"] > 0 and result["loop_ms_per_step"] > 0
    assert len(result["ratio_trainer_over_loop_per_round"]) == result["rounds"] == 2
    rounds = sorted(result["ratio_trainer_over_loop_per_round"])
    assert rounds[0] <= result["ratio_trainer_over_loop_paired_median"] <= rounds[-1]
    assert sorted(result["part_us_per_call"]) == ["callbacks", "count", "next_batch", "to_device"]
    assert all(us > 0 for us in result["part_us_per_call"].values())
    rows = headlines.host_overhead(result)
    assert rows[0].value == result["ratio_trainer_over_loop_paired_median"] and rows[0].low == rounds[0]


def test_microseconds_per_call_is_the_median():
    calls = iter(range(100))
    assert host_overhead.microseconds_per_call(lambda: next(calls), 9) >= 0
    assert next(calls) == 10  # one untimed call, then the timed ones
