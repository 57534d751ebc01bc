"""Smoke test of benchmarks/gpu.py at tiny size on the CPU (no timing asserted), and its config choice."""

import json

import numpy as np
import pytest

from benchmarks import gpu
from easytrain.errors import ArgumentError

SIZES = dict(batch=4, length=2048, param_dtype="float32", remat="full")


def test_gpu_benchmark_smoke(tmp_path):
    out = tmp_path / "gpu.json"
    result = gpu.main(["--quick", "--out", str(out), "--seed", "3"])  # --seed: passed on to TrainingArguments
    assert json.loads(out.read_text()) == result
    assert result["config"] == "tiny" and result["measured_steps"] == 2 and result["extra_arguments"] == ["--seed", "3"]
    assert result["tokens_per_second"]["median"] > 0 and result["tokens_per_second_overall"] > 0
    assert result["mfu"]["median"] > 0 and result["peak_source"]  # the CPU's measured peak
    assert result["planned_mib"] > 0  # the compiled step's plan, beside the estimate
    assert result["setup_seconds"] > 0 and not result["setup_only"]


def test_trailing_padding_masks_the_end_of_each_row():
    """`--padding`: rows end in padding (attention mask 0, no loss), a mean fraction of their slots."""
    result = gpu.main(["--quick", "--padding", "0.25", "--steps", "4", "--batch", "8"])
    assert result["padding"] == 0.25 and 0.6 < result["padding_efficiency"]["median"] < 0.9
    blocks = {"input_ids": np.ones((256, 32), np.int32), "loss_mask": np.ones((256, 32), np.float32)}
    batch = gpu.trailing_padding(blocks, np.arange(256), 0.5)
    mask = batch["attention_mask"]
    assert (mask[:, 0] == 1).all() and (batch["loss_mask"] == mask).all()
    assert (np.diff(mask, axis=1) <= 0).all()  # real tokens, then padding: trailing
    assert 0.4 < 1 - mask.mean() < 0.6 and mask.sum(1).min() < 8  # a mean half of the slots, some rows mostly
    with pytest.raises(SystemExit):
        gpu.parse(["--quick", "--padding", "0.7"])


def test_unknown_pass_through_flag_fails_before_anything_is_built():
    with pytest.raises(ArgumentError, match="no_such_field.*passes flags it does not know on to TrainingArguments"):
        gpu.main(["--quick", "--no_such_field", "1"])


def test_the_largest_config_that_fits_is_chosen():
    estimates = {name: gpu.estimated_bytes(gpu.llama(name), **SIZES) for name in gpu.CONFIGS}
    assert list(estimates.values()) == sorted(estimates.values())
    assert gpu.pick_config(estimates["llama-3b"], **SIZES) == "llama-3b"
    assert gpu.pick_config(estimates["llama-3b"] - 1, **SIZES) == "llama-1b"
    assert gpu.pick_config(10**15, **SIZES) == "llama-8b"
    with pytest.raises(ArgumentError, match="none of"):
        gpu.pick_config(estimates["llama-1b"] - 1, **SIZES)
    with pytest.raises(ArgumentError, match="pass --config"):
        gpu.pick_config(None, **SIZES)


def test_parameter_count_matches_the_model():
    import jax
    from flax import nnx

    from easytrain.models import init_model

    config = gpu.llama("tiny")
    params = nnx.state(nnx.eval_shape(lambda: init_model(config)), nnx.Param)
    assert gpu.parameter_count(config) == sum(leaf.size for leaf in jax.tree.leaves(params))


def test_setup_only_times_the_state_initialisation_and_trains_nothing():
    result = gpu.main(["--quick", "--setup_only"])
    assert result["setup_only"] and result["setup_seconds"] > 0
    assert result["measured_steps"] == 0 and result["tokens_per_second"] is None and result["final_loss"] is None
    assert result["threefry_gpu_kernel_lowering"] is False
