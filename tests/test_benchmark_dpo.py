"""benchmarks/dpo.py runs at the tiniest size and reports every number (no timing is asserted)."""

import json
from pathlib import Path

import pytest

from script_modules import load_script

BENCHMARK = Path(__file__).resolve().parents[1] / "benchmarks" / "dpo.py"
SIDES = ("sft", "dpo_frozen", "dpo_precomputed", "dpo_sync_every_step", "dpo_adapter_off_lora")


def load():
    return load_script("benchmark_dpo", BENCHMARK, register=True)  # its dataclasses look their module up by name


@pytest.mark.usefixtures("collections_of_this_test")  # its gc.collect calls: this test's objects
def test_dpo_benchmark_smoke(tmp_path):
    out, config = tmp_path / "dpo.json", tmp_path / "config.json"
    config.write_text(json.dumps(dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                                      num_key_value_heads=1, max_position_embeddings=64, vocab_size=64)))
    result = load().main(["--quick", "--model_config", str(config), "--max_length", "16", "--pairs", "2",
                          "--steps", "1", "--repeats", "2", "--warmup_steps", "1", "--naive_step",
                          "--logps_shape", "2", "8", "512", "--logps_chunk_size", "128", "--lora_rank", "2",
                          "--out", str(out)])
    assert json.loads(out.read_text()) == result
    assert result["vocab_size"] == 64 and result["params"] > 0
    assert result["sequences_per_step"] == 4 and result["tokens_per_step"] == 4 * 16
    for side in SIDES:
        for key in ("step_seconds", "step_cpu_seconds"):
            seconds = result[key][side]
            assert set(seconds) == {"median", "min", "max"} and all(v > 0 for v in seconds.values()), (side, seconds)
        assert result["first_step_seconds"][side] > 0
    for key in ("ratio_over_sft", "cpu_ratio_over_sft"):
        for side in SIDES[1:]:
            ratio = result[key][side]
            assert ratio["of_medians"] > 0 and ratio["of_minimums"] > 0, (key, side, ratio)
            assert all(v > 0 for v in ratio["per_repeat"].values()), (key, side, ratio)

    memory = result["memory"]
    states = memory["state_bytes"]
    for side in SIDES:
        assert states[side]["total"] > 0 and states[side]["params"] > 0 and states[side]["opt_state"] > 0
        assert memory["live_bytes_added_by_setup"][side] > 0
    params = states["sft"]["params"]
    assert states["dpo_frozen"]["frozen"] == params, "the frozen reference is one more copy of the weights"
    assert states["dpo_sync_every_step"]["frozen"] == params, "TR-DPO moves that one copy, adds none"
    assert states["sft"]["frozen"] == states["dpo_precomputed"]["frozen"] == 0
    for side in (*SIDES, "dpo_frozen_naive_logps"):
        step = memory["train_step"][side]
        assert step["argument"] > 0 and step["output"] > 0 and step["alias"] > 0 and step["temp"] >= 0, (side, step)
        assert step["step_peak_estimate"] >= step["argument"]
    lora = states["dpo_adapter_off_lora"]
    assert lora["frozen"] == 0, "the adapter-off reference holds no weights of its own"
    assert lora["base"] + lora["params"] < params + states["dpo_frozen"]["frozen"], "one copy of the base, not two"
    assert lora["opt_state"] < states["dpo_frozen"]["opt_state"] / 4, "optimizer state for the adapters only"
    if result["platform"] == "cpu":
        assert memory["device_peak_bytes"] is None and memory["device_peak_note"]

    logps = result["logps_memory"]
    assert logps["shape_BTV"] == [2, 8, 512] and logps["chunk_size"] == 128
    for dtype in ("bfloat16", "float32"):
        assert logps[dtype]["logits_bytes"] > 0
        for pass_name in ("forward", "gradient", "value_and_grad"):
            entry = logps[dtype][pass_name]
            assert entry["naive_temp_bytes"] > 0 and entry["chunked_temp_bytes"] >= 0, (dtype, pass_name, entry)
            assert entry["naive_over_chunked"] > 0 and entry["output_bytes"] > 0
