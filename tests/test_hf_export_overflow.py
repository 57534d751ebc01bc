"""A float16 export refuses weights beyond float16's range (largest finite 65504), naming the tensor and its largest
|value|, before any file is written: cast as they were, float32/bfloat16 weights past it became inf in the
safetensors without a word (as ``model.to(torch.float16)`` makes them in transformers), and the exported model
computed inf/NaN logits."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file

from easytrain import lora
from easytrain.lora import LoRAConfig
from easytrain.models import from_pretrained, init_model, narrowing
from easytrain.models.hf_io import CheckpointError, save_pretrained
from easytrain.models.narrowing import check_range
from easytrain.models.peft_io import save_peft_adapter

from model_configs import tiny_config
from narrowed_exports import DOWN, params_with

BEYOND = 1.0e5  # past float16's largest (65504); 99840 in bfloat16


@pytest.mark.parametrize("param_dtype", [jnp.float32, jnp.bfloat16])
def test_a_weight_past_float16s_range_is_refused_by_name_before_any_file(tmp_path, param_dtype):
    params, config = params_with(BEYOND, param_dtype)
    refusal = rf"65504\): {DOWN}: largest \|value\| (100000|99840)\. .*bfloat16"
    with pytest.raises(CheckpointError, match=refusal) as info:
        save_pretrained(tmp_path / "export", params, config, dtype="float16")
    assert "dtype='float16'" in str(info.value)
    assert not (tmp_path / "export").exists()


def test_a_stacked_layers_overflow_names_its_layer(tmp_path):
    params, config = params_with(BEYOND, scan_layers=True)
    with pytest.raises(CheckpointError, match=DOWN):
        save_pretrained(tmp_path / "export", params, config, dtype="float16")


def test_weights_within_range_and_other_dtypes_export_as_before(tmp_path):
    params, config = params_with(65504.0)  # float16's largest: exact
    save_pretrained(tmp_path / "f16", params, config, dtype="float16")
    assert load_file(tmp_path / "f16" / "model.safetensors")[DOWN][5, 3] == np.float16(65504.0)
    params, config = params_with(BEYOND)
    save_pretrained(tmp_path / "bf16", params, config, dtype="bfloat16")
    assert load_file(tmp_path / "bf16" / "model.safetensors")[DOWN][5, 3] == 99840  # 1e5 in bfloat16


def test_an_inf_already_in_the_weights_is_not_called_an_overflow(tmp_path):
    """An inf or NaN weight is inf or NaN in any dtype: the cast changes nothing there, so it is no refusal of it
    (and a NaN elsewhere in the tensor hides no overflow)."""
    params, config = params_with(float("inf"))
    save_pretrained(tmp_path / "export", params, config, dtype="float16")
    params, config = params_with(BEYOND)
    kernel = params["layers"][1]["mlp"]["down_proj"]["kernel"]
    params["layers"][1]["mlp"]["down_proj"]["kernel"] = kernel.at[0, 0].set(float("nan"))
    with pytest.raises(CheckpointError, match=DOWN):
        save_pretrained(tmp_path / "nan", params, config, dtype="float16")


def test_an_adapter_past_float16s_range_is_refused_by_name(tmp_path):
    config = LoRAConfig(rank=2, alpha=4, target_modules=["q_proj"])
    model = lora.apply_lora(init_model(tiny_config(), seed=0), config)
    model.layers[0].self_attn.q_proj.lora_b.value = model.layers[0].self_attn.q_proj.lora_b.value.at[0, 0].set(1e6)
    refusal = r"layers\.0\.self_attn\.q_proj\.lora_B\.weight: largest \|value\| 1e\+06\. .*bfloat16"
    with pytest.raises(CheckpointError, match=refusal):
        save_peft_adapter(tmp_path / "adapter", model, config, dtype="float16")
    assert not (tmp_path / "adapter").exists()
    save_peft_adapter(tmp_path / "adapter", model, config, dtype="bfloat16")


def test_the_refusal_starts_where_float16_rounds_to_inf():
    """65504 < |x| < 65520 round to 65504 (float16's largest), 65520 to inf."""
    check_range({"w": np.float32(65519.99)}, np.float16, "the export", "dtype")
    with np.errstate(over="ignore"):
        assert np.float16(np.float32(65519.99)) == 65504 and np.isinf(np.float16(np.float32(65520.0)))
    with pytest.raises(CheckpointError, match="w: largest"):
        check_range({"w": 65520.0}, np.float16, "the export", "dtype")


def test_a_float16_load_refuses_weights_beyond_its_range_by_name(tmp_path):
    """from_pretrained(param_dtype=float16) casts each weight as it is read: a float32 checkpoint's 1e5 became inf
    in the loaded model without a word."""
    params, config = params_with(BEYOND)
    save_pretrained(tmp_path / "export", params, config)
    with pytest.raises(CheckpointError, match=rf"{DOWN}: largest \|value\| 100000\. .*param_dtype"):
        from_pretrained(tmp_path / "export", param_dtype=jnp.float16)
    model = from_pretrained(tmp_path / "export", param_dtype=jnp.bfloat16)
    assert float(model.layers[1].mlp.down_proj.kernel.value[3, 5]) == 99840


def test_a_float16_load_refuses_what_another_process_read_beyond_its_range(tmp_path, monkeypatch):
    """Over a mesh spanning processes each reads only its own blocks: a block past float16's range refused only on
    the process holding it left the others loaded, to wait in their next collective. Every process now refuses the
    tensors any of them found (here a second process's row, gathered, finds every tensor at 70000)."""
    params, config = params_with(1.0)
    save_pretrained(tmp_path / "export", params, config)
    monkeypatch.setattr(narrowing, "every_process_gather",
                        lambda: lambda local: np.stack([local, np.full_like(local, 7.0e4)]))
    with pytest.raises(CheckpointError, match=r"param_dtype='float16' cannot hold \d+ tensor\(s\).*largest \|value\| "
                                              r"70000; .*param_dtype='bfloat16'"):
        from_pretrained(tmp_path / "export", param_dtype=jnp.float16)


@pytest.mark.parametrize("stored, value, loaded", [
    ("float32", 65519.99, 65504.0),  # rounds to float16's largest: loads
    ("float32", 65520.0, None),  # rounds to inf: refused
    ("bfloat16", 1.0e5, None),  # stored as 99840
    ("float32", float("inf"), float("inf")),  # inf in any dtype: the cast changes nothing, loads as stored
])
def test_a_float16_load_refuses_exactly_what_the_cast_makes_inf(tmp_path, stored, value, loaded):
    params, config = params_with(value)
    save_pretrained(tmp_path / "export", params, config, dtype=stored)
    if loaded is None:
        with pytest.raises(CheckpointError, match=rf"{DOWN}: largest \|value\| (65520|99840)\. "):
            from_pretrained(tmp_path / "export", param_dtype=jnp.float16)
        return
    model = from_pretrained(tmp_path / "export", param_dtype=jnp.float16)
    assert float(model.layers[1].mlp.down_proj.kernel.value[3, 5]) == loaded


def test_a_float64_weight_just_below_the_rounding_point_exports(tmp_path):
    """numpy casts float64 to float16 in one rounding: 65519.999 becomes 65504. Its peak was taken in float32 first,
    where it rounds to 65520, and the export refused it."""
    params, config = params_with(1.0)
    params = jax.tree.map(lambda leaf: np.asarray(leaf, np.float64), params)
    params["layers"][1]["mlp"]["down_proj"]["kernel"][3, 5] = 65519.999
    save_pretrained(tmp_path / "export", params, config, dtype="float16")
    assert load_file(tmp_path / "export" / "model.safetensors")[DOWN][5, 3] == np.float16(65504.0)
