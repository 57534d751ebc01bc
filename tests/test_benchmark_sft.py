"""benchmarks/sft.py runs at the tiniest size and reports every number (no timing is asserted)."""

import json
from pathlib import Path

from script_modules import load_script

BENCHMARK = Path(__file__).resolve().parents[1] / "benchmarks" / "sft.py"


def load():
    return load_script("benchmark_sft", BENCHMARK, register=True)  # its dataclasses look their module up by name


def test_sft_benchmark_smoke(tmp_path):
    out, config = tmp_path / "sft.json", tmp_path / "config.json"
    config.write_text(json.dumps(dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                                      num_key_value_heads=1, max_position_embeddings=64)))
    result = load().main(["--quick", "--model_config", str(config), "--max_length", "32", "--batch_size", "4",
                          "--num_conversations", "48", "--steps", "2", "--repeats", "2", "--warmup_steps", "1",
                          "--out", str(out)])
    assert json.loads(out.read_text()) == result
    for side in ("packing", "padding"):
        for key in ("supervised_tokens_per_second", "real_tokens_per_second", "steps_per_second"):
            assert set(result[side][key]) == {"median", "min", "max"}
            assert all(value > 0 for value in result[side][key].values()), (side, key, result[side][key])
        assert result[side]["supervised_tokens_per_second_overall"] > 0
        assert 0 < result[side]["fill_rate"] <= 1
        assert result[side]["compiled_shapes"] >= 1
        assert sum(result[side]["timed_batches_by_row_length"].values()) == 2 * 2
    assert result["packing"]["compiled_shapes"] == 1
    assert result["padding"]["buckets"] == [16, 32]
    assert set(result["padding"]["buckets_compiled"]) <= {16, 32}
    assert set(result["padding"]["timed_batches_by_row_length"]) <= {"16", "32"}
    assert all(value > 0 for value in result["speedup_supervised_tokens_per_second"].values())
    assert result["compiles_while_timed"] in (0, None)  # every shape compiled before timing
    data = result["data"]
    assert data["kept"] == data["conversations"] == 48
    assert 0 < data["supervised_fraction"] < 1 and data["tokens_max"] <= 33
