"""Smoke test of benchmarks/data.py at a tiny size (no timing asserted)."""

import json

from benchmarks import data


def test_data_benchmark_smoke(tmp_path):
    out = tmp_path / "data.json"
    result = data.main(["--quick", "--conversations", "200", "--batches", "5", "--train_steps", "2",
                        "--out", str(out)])
    assert json.loads(out.read_text()) == result
    assert result["tokens"] > 0 and 0 < result["packed_rows"] < 200
    for key in ("tokenize_tokens_per_second", "pack_tokens_per_second", "batch_tokens_per_second",
                "train_tokens_per_second", "prepare_over_train", "batch_over_train"):
        assert result[key] > 0, key
    assert list(result["resume_first_batch_seconds"]) == ["0", "1000", "100000", "10000000"]
