"""Every narrowing export refuses a finite weight the cast would write as inf, by the load's rule (`becomes_inf`):
a bfloat16 export checked no range, and a float32 weight from about 3.396e38 (where numpy's cast rounds past
bfloat16's largest, 3.390e38) was written as inf without a word."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from safetensors.numpy import load_file

from easytrain import lora
from easytrain.lora import LoRAConfig
from easytrain.models import init_model, narrowing
from easytrain.models.hf_io import CheckpointError, save_pretrained
from easytrain.models.peft_io import save_peft_adapter

from model_configs import tiny_config
from narrowed_exports import DOWN, params_with


def _bfloat16_edge() -> np.float32:
    """The smallest float32 that numpy's cast makes a bfloat16 inf (found by the cast itself, not a constant)."""
    low, high = np.float32(ml_dtypes.finfo(ml_dtypes.bfloat16).max), np.finfo(np.float32).max
    low_bits, high_bits = int(low.view(np.uint32)), int(high.view(np.uint32))
    with np.errstate(over="ignore"):
        while high_bits - low_bits > 1:  # cast(low) finite, cast(high) inf
            middle = (low_bits + high_bits) // 2
            value = np.uint32(middle).view(np.float32)
            low_bits, high_bits = (middle, high_bits) if np.isfinite(value.astype(ml_dtypes.bfloat16)) else (
                low_bits, middle)
    return np.uint32(high_bits).view(np.float32)


EDGE = _bfloat16_edge()


def test_the_edge_is_where_numpy_rounds_past_bfloat16s_largest():
    with np.errstate(over="ignore"):
        below = np.nextafter(EDGE, np.float32(0))
        assert np.isinf(EDGE.astype(ml_dtypes.bfloat16)) and np.isfinite(below.astype(ml_dtypes.bfloat16))
    assert 3.396e38 < EDGE < 3.397e38  # 2**128 - 2**119
    assert narrowing.becomes_inf(EDGE, ml_dtypes.bfloat16)
    assert not narrowing.becomes_inf(below, ml_dtypes.bfloat16)


@pytest.mark.parametrize("scan_layers", [False, True])
def test_a_bfloat16_export_refuses_a_weight_it_would_write_as_inf(tmp_path, scan_layers):
    """Was: written, the tensor holding inf (3.4e38 casts to bfloat16's inf)."""
    params, config = params_with(float(EDGE), scan_layers=scan_layers)
    with pytest.raises(CheckpointError, match=rf"dtype='bfloat16' cannot hold 1 tensor\(s\) of the export.*"
                                              rf"{DOWN}: largest \|value\| 3\.39\d+e\+38\. Pass dtype='float32'"):
        save_pretrained(tmp_path / "export", params, config, dtype="bfloat16")
    assert not (tmp_path / "export").exists()


def test_a_bfloat16_export_writes_the_largest_value_it_rounds_to_a_finite_one(tmp_path):
    below = np.nextafter(EDGE, np.float32(0))
    params, config = params_with(float(below))
    save_pretrained(tmp_path / "export", params, config, dtype="bfloat16")
    written = load_file(tmp_path / "export" / "model.safetensors")[DOWN][5, 3]
    assert written == np.asarray(below, ml_dtypes.bfloat16) and np.isfinite(written)
    save_pretrained(tmp_path / "float32", *params_with(float(EDGE)), dtype="float32")  # float32 holds it: no check
    assert load_file(tmp_path / "float32" / "model.safetensors")[DOWN][5, 3] == EDGE


def test_a_float64_weight_past_float32s_range_is_refused_naming_the_checkpoint_as_the_fix(tmp_path):
    params, config = params_with(1.0)
    params = jax.tree.map(lambda leaf: np.asarray(leaf, np.float64), params)
    params["layers"][1]["mlp"]["down_proj"]["kernel"][3, 5] = -1e300
    with pytest.raises(CheckpointError, match=rf"dtype='float32' .*{DOWN}: largest \|value\| 1e\+300\. Not even "
                                              "float32 holds"):
        save_pretrained(tmp_path / "export", params, config, dtype="float32")
    assert not (tmp_path / "export").exists()


def test_an_export_of_the_parameters_own_dtype_checks_nothing(tmp_path, monkeypatch):
    """A bfloat16 model written as bfloat16 narrows nothing: no reduction, no transfer."""
    calls = []
    monkeypatch.setattr(narrowing, "_peak", lambda *args, **kwargs: calls.append(args))
    params, config = params_with(1.0, param_dtype=jnp.bfloat16)
    save_pretrained(tmp_path / "export", params, config, dtype="bfloat16")
    assert calls == []


def test_an_adapter_past_bfloat16s_range_is_refused_by_name(tmp_path):
    config = LoRAConfig(rank=2, alpha=4, target_modules=["q_proj"])
    model = lora.apply_lora(init_model(tiny_config(), seed=0), config)
    q_proj = model.layers[0].self_attn.q_proj
    q_proj.lora_b.value = q_proj.lora_b.value.at[0, 0].set(float(EDGE))
    with pytest.raises(CheckpointError, match=r"dtype='bfloat16' .*lora_B\.weight: largest \|value\| 3\.39"):
        save_peft_adapter(tmp_path / "adapter", model, config, dtype="bfloat16")
    assert not (tmp_path / "adapter").exists()


@pytest.mark.parametrize("dtype, peak", [("bfloat16", 3.4e38), ("float16", 7.0e4)])
def test_every_process_refuses_what_any_process_found(tmp_path, monkeypatch, dtype, peak):
    """The peaks are agreed over processes (the load's `agreed_peaks`): here a second process's row, gathered,
    finds every narrowed tensor at `peak`, and this process refuses too instead of waiting in the next gather."""
    params, config = params_with(1.0)
    monkeypatch.setattr(narrowing, "every_process_gather",
                        lambda: lambda local: np.stack([local, np.full_like(local, peak)]))
    with pytest.raises(CheckpointError, match=rf"dtype='{dtype}' cannot hold \d+ tensor\(s\) of the export"):
        save_pretrained(tmp_path / "export", params, config, dtype=dtype)
    assert not (tmp_path / "export").exists()


@pytest.mark.parametrize("scan_layers", [False, True])
def test_a_weight_on_one_cpu_device_is_read_in_place_without_a_compile(tmp_path, monkeypatch, scan_layers):
    """numpy reads a single-device CPU array's buffer in place: no reduction compiled per weight shape (0.2-0.7 s
    the first time in a process on a 58.5M-parameter model), the same refusal, a NaN beside the overflow too."""
    def compiled(*args, **kwargs):
        raise AssertionError("a reduction was compiled for a weight on one CPU device")

    monkeypatch.setattr(narrowing, "_device_peak", compiled)
    params, config = params_with(float(EDGE), scan_layers=scan_layers)
    down = params["layers"]["stacked" if scan_layers else 1]["mlp"]["down_proj"]
    down["kernel"] = down["kernel"].at[(1, 0, 0) if scan_layers else (0, 0)].set(np.nan)
    with pytest.raises(CheckpointError, match=rf"{DOWN}: largest \|value\| 3\.39"):
        save_pretrained(tmp_path / "export", params, config, dtype="bfloat16")
    save_pretrained(tmp_path / "export", *params_with(1.0, scan_layers=scan_layers), dtype="bfloat16")


@pytest.mark.parametrize("axes", [None, (1, 2)])
def test_the_compiled_peak_equals_the_in_place_one(axes):
    """Arrays on other devices (or spread over several) are reduced where they are, by the same rule."""
    values = np.random.RandomState(0).randn(3, 4, 5).astype(np.float32) * 1e3
    values[0, 1, 2], values[2, 0, 0], values[1, 3, 3] = np.nan, -np.inf, -7e4
    for finite in (False, True):
        compiled = np.asarray(narrowing._device_peak(jnp.asarray(values), axes, finite))
        np.testing.assert_array_equal(compiled, narrowing._peak(values, axes, finite))
