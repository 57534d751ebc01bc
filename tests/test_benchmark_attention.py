"""Smoke test of benchmarks/attention.py at a tiny size (no timing asserted)."""

import json

from benchmarks import attention


def test_attention_benchmark_smoke(tmp_path):
    out = tmp_path / "attention.json"
    result = attention.main(["--quick", "--lengths", "16", "--repeats", "1", "--out", str(out)])
    assert json.loads(out.read_text()) == result
    assert result["kernel"] == "xla" and [row["length"] for row in result["lengths"]] == [16]
    assert result["splash_interpreted"] and set(result["lengths"][0]["over_xla"]) == {"dot_product_attention", "splash"}
    for side in result["lengths"][0]["implementations"].values():
        assert side["temp"] > 0 and side["step_seconds"]["median"] > 0
