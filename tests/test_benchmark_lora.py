"""benchmarks/lora.py runs at the tiniest size, one round of child processes, and reports every number (no timing
is asserted)."""

import json
import math
from pathlib import Path

from script_modules import load_script

BENCHMARK = Path(__file__).resolve().parents[1] / "benchmarks" / "lora.py"
#: One layer, hidden 32, head_dim 16, 1 KV head, MLP 64, vocab 64, untied head.
CONFIG = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
              max_position_embeddings=64, vocab_size=64, tie_word_embeddings=False)
RANK = 2
#: rank * (in + out) of q (32->32), k and v (32->16), o (32->32), gate and up (32->64), down (64->32).
LORA_PARAMS = RANK * (64 + 48 + 48 + 64 + 96 + 96 + 96)
#: embedding and head (64 x 32 each), the projections above, three RMSNorm scales.
FULL_PARAMS = 2 * 64 * 32 + (32 * 32 + 2 * 32 * 16 + 32 * 32) + 3 * 32 * 64 + 3 * 32


def load():
    return load_script("benchmark_lora", BENCHMARK, register=True)


def positive(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value) and value > 0


def test_lora_benchmark_smoke(tmp_path):
    out, config = tmp_path / "lora.json", tmp_path / "config.json"
    config.write_text(json.dumps(CONFIG))
    result = load().main(["--quick", "--model_config", str(config), "--lora_rank", str(RANK), "--batch_size", "2",
                          "--max_length", "16", "--steps", "1", "--windows", "2", "--warmup_steps", "1",
                          "--rounds", "1", "--out", str(out)])
    assert json.loads(out.read_text()) == result
    assert result["model"] == CONFIG and result["rounds"] == 1 and result["tokens_per_step"] == 2 * 16
    assert result["lora_rank"] == RANK and result["params"] == FULL_PARAMS
    assert result["weights_mib"] == round(FULL_PARAMS * 4 / 2**20, 1)

    full, lora = result["sides"]["full"], result["sides"]["lora"]
    assert full["trainable_params"] == FULL_PARAMS and lora["trainable_params"] == LORA_PARAMS
    assert lora["trainable_params"] < full["trainable_params"] / 4
    for name, side in result["sides"].items():
        states = side["state_bytes"]
        assert states["params_float"] == states["params"] == 4 * side["trainable_params"], name  # float32
        assert states["opt_state_float"] == 2 * states["params"], f"{name}: AdamW's mu and nu"
        assert 0 < states["opt_state"] - states["opt_state_float"] <= 64, f"{name}: besides them only step counters"
        parts = states["params"] + states["opt_state"] + states["base"] + states["model_state"]
        assert 0 < states["total"] - parts <= 64, f"{name}: besides them only the step counter and the PRNG key"
        for key in ("step_seconds", "step_cpu_seconds"):
            assert set(side[key]) == {"median", "min", "max"} and all(map(positive, side[key].values())), (name, key)
            assert side[key]["min"] <= side[key]["median"] <= side[key]["max"]
        for key in ("tokens_per_second", "setup_seconds", "compile_seconds", "first_step_seconds",
                    "rss_after_imports_mib", "peak_rss_setup_mib", "peak_rss_before_steps_mib"):
            assert positive(side[key]), (name, key, side[key])
        assert all(map(positive, side["peak_rss_mib"].values()))
        peak = side["peak_rss_mib"]["median"]
        assert peak >= side["peak_rss_before_steps_mib"] >= side["peak_rss_setup_mib"] >= side["rss_after_imports_mib"]
        assert side["peak_rss_steps_mib"] is None or 0 < side["peak_rss_steps_mib"] <= peak
        step = side["train_step_memory"]
        assert all(map(positive, step.values())), (name, step)
        assert step["alias"] == states["total"], f"{name}: the state is donated"
        assert step["step_peak_estimate"] == step["argument"] + step["output"] - step["alias"] + step["temp"]
        if result["platform"] == "cpu":
            assert side["device_peak_bytes"] is None and side["device_peak_note"]
    assert full["state_bytes"]["base"] == 0 and lora["state_bytes"]["base"] == full["state_bytes"]["params"]
    assert lora["state_bytes"]["opt_state"] < full["state_bytes"]["opt_state"] / 4

    ratios = result["lora_over_full"]
    for key, value in ratios.items():
        if key == "step_seconds_per_round":
            assert all(map(positive, value.values())), value
        elif key != "peak_rss_steps" or value is not None:
            assert positive(value), (key, value)
    assert ratios["trainable_params"] == round(LORA_PARAMS / FULL_PARAMS, 4)
