"""Smoke test of benchmarks/checkpoint.py at a tiny size (no timing asserted)."""

import json

from benchmarks import checkpoint


def test_checkpoint_benchmark_smoke(tmp_path):
    out = tmp_path / "checkpoint.json"
    result = checkpoint.main(["--megabytes", "6", "--repeats", "1", "--out", str(out)])
    assert json.loads(out.read_text()) == result
    assert result["state_bytes"] >= 6 * 2**20 * 0.9 and result["leaves"] >= 3
    for key in ("async_blocked_seconds", "async_total_seconds", "sync_seconds", "restore_seconds"):
        assert set(result[key]) == {"median", "min", "max"} and result[key]["median"] > 0, key
    assert result["blocked_over_sync"] > 0
    assert set(result["peak_added_over_state"]) == {"async", "sync"}


def test_checkpoint_benchmark_stacks_blocks_like_scan_layers(tmp_path):
    result = checkpoint.main(["--megabytes", "24", "--repeats", "1", "--stack_layers", "2"])
    assert result["stack_layers"] == 2 and result["restore_seconds"]["median"] > 0
    assert result["leaves"] == 3 * 1 + 1  # two blocks per part stacked into one [2, 1024, 1024], and the step
    assert checkpoint.main(["--megabytes", "24", "--repeats", "1"])["leaves"] == 3 * 2 + 1
