"""Precision settings refused or warned about before any compute: float16 parameters in a module the trainer is
given or builds (AdamW's epsilon and small squared gradients are zero in float16, so the first update is
non-finite), bfloat16 storage under LoRA only for what LoRA trains in it, and an export dtype transformers loads."""

import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from easytrain import ArgumentError, BaseTrainer, TrainingArguments, argument_checks
from easytrain.models import init_model, save_pretrained
from easytrain.models.hf_io import CheckpointError
from easytrain.tasks import build_arithmetic_tokenizer
from model_configs import tiny_config
from test_custom_module_errors import MLP, Classifier, arguments, with_hook


def _module(dtype, param_dtype) -> MLP:
    with nnx.use_eager_sharding(False):  # built outside any mesh, as a caller builds it
        return MLP(nnx.Rngs(0), dtype, param_dtype)


@pytest.mark.parametrize("compute", [jnp.float32, None], ids=["float32-compute", "input-dtype-compute"])
def test_a_given_module_with_float16_parameters_is_refused(tmp_path, compute) -> None:
    model = _module(compute, jnp.float16)
    trainer = Classifier(arguments(tmp_path), model=model)
    with pytest.raises(ArgumentError, match=r"^param_dtype: .*model=.*float16.*l1\.kernel.*param_dtype=float32"):
        trainer.setup()
    assert model.l1.kernel[...].dtype == jnp.float16  # refused before anything was placed or trained


def test_a_given_llama_with_float16_parameters_is_refused(tmp_path) -> None:
    config = tiny_config(vocab_size=len(build_arithmetic_tokenizer()), max_position_embeddings=64)
    model = init_model(config, dtype=jnp.float32, param_dtype=jnp.float16)
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=2, max_length=16, train_batch_size=4,
                             eval_strategy="no", save_strategy="no", report_to=["none"], disable_progress_bar=True,
                             save_pretrained_at_end=False, max_train_samples=16)
    trainer = BaseTrainer(args, model=model)
    with pytest.raises(ArgumentError, match=r"^param_dtype: .*model=.* in float16 \(embed_tokens\.embedding, "):
        trainer.setup()


def _llama_arguments(tmp_path, **fields) -> TrainingArguments:
    return TrainingArguments(output_dir=str(tmp_path), max_steps=2, max_length=16, train_batch_size=4,
                             eval_strategy="no", save_strategy="no", report_to=["none"], disable_progress_bar=True,
                             save_pretrained_at_end=False, max_train_samples=16, **fields)


def test_a_float16_base_lora_keeps_frozen_trains(tmp_path) -> None:
    """LoRA trains float32 adapters over a frozen base, which gets no optimizer state: a float16 base is fine."""
    config = tiny_config(vocab_size=len(build_arithmetic_tokenizer()), max_position_embeddings=64)
    model = init_model(config, dtype=jnp.bfloat16, param_dtype=jnp.float16)
    trainer = BaseTrainer(_llama_arguments(tmp_path, dtype="bfloat16", param_dtype="bfloat16", lora_rank=4),
                          model=model)
    logs = trainer.train()
    assert np.isfinite(logs["loss"]) and {leaf.dtype for leaf in jax.tree.leaves(trainer.state.params)} == {
        jnp.dtype(jnp.float32)}


def test_float16_norms_lora_trains_in_full_are_refused(tmp_path) -> None:
    config = tiny_config(vocab_size=len(build_arithmetic_tokenizer()), max_position_embeddings=64)
    model = init_model(config, dtype=jnp.bfloat16, param_dtype=jnp.float16)
    arguments = _llama_arguments(tmp_path, dtype="bfloat16", param_dtype="bfloat16", lora_rank=4, lora_train_norms=True)
    with pytest.raises(ArgumentError, match=r"^param_dtype: .*model=.*float16.*norm\.scale"):
        BaseTrainer(arguments, model=model).setup()


def test_a_created_module_with_float16_parameters_is_refused(tmp_path) -> None:
    trainer = with_hook("create_module", lambda self: MLP(nnx.Rngs(0), jnp.float32, jnp.float16))(arguments(tmp_path))
    with pytest.raises(ArgumentError, match=r"^param_dtype: .*create_module.*float16.*l1\.kernel"):
        trainer.setup()


@pytest.fixture
def fresh_warnings():
    argument_checks.warn_bfloat16_state.cache_clear()  # one warning per process for the same settings
    yield
    argument_checks.warn_bfloat16_state.cache_clear()


def _param_dtype_warnings(caplog, tmp_path, **fields) -> list[str]:
    with caplog.at_level(logging.WARNING, logger="easytrain"):
        TrainingArguments(output_dir=str(tmp_path), param_dtype="bfloat16", dtype="bfloat16", **fields)
    return [r.getMessage() for r in caplog.records if "param_dtype" in r.getMessage()]


def test_lora_adapters_alone_are_not_warned_about(tmp_path, caplog, fresh_warnings) -> None:
    # The adapters and their optimizer state are float32; only the frozen base is stored in bfloat16.
    assert _param_dtype_warnings(caplog, tmp_path, lora_rank=4) == []


@pytest.mark.parametrize("field, trained", [("lora_train_embeddings", "embedding"), ("lora_train_norms", "norm")])
def test_what_lora_trains_in_bfloat16_is_warned_about(tmp_path, caplog, fresh_warnings, field, trained) -> None:
    warned = _param_dtype_warnings(caplog, tmp_path, lora_rank=4, **{field: True})
    assert len(warned) == 1, warned
    assert field in warned[0] and trained in warned[0] and "adapters" in warned[0], warned
    assert "rounded away" in warned[0] and "--param_dtype float32" in warned[0], warned


def test_full_training_in_bfloat16_is_still_warned_about(tmp_path, caplog, fresh_warnings) -> None:
    warned = _param_dtype_warnings(caplog, tmp_path)
    assert len(warned) == 1 and "master weights" in warned[0] and "lora" not in warned[0], warned


@pytest.mark.parametrize("dtype", ["float8_e4m3fn", "float64", jnp.float64, "int8"])
def test_an_export_dtype_transformers_does_not_load_is_refused(tmp_path, dtype) -> None:
    model = init_model(tiny_config())
    with pytest.raises(CheckpointError, match=r"dtype=.*'float32', 'bfloat16' or 'float16'"):
        save_pretrained(tmp_path / "out", model, model.config, dtype=dtype)
    assert not (tmp_path / "out").exists(), "nothing is written before the dtype is checked"


def test_parameters_kept_in_a_dtype_transformers_does_not_load_are_refused(tmp_path) -> None:
    model = init_model(tiny_config())
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    params["embed_tokens"]["embedding"] = np.asarray(params["embed_tokens"]["embedding"], np.float64)
    with pytest.raises(CheckpointError, match=r"dtype=None .*model\.embed_tokens\.weight.*float64.*'float32'"):
        save_pretrained(tmp_path / "out", params, model.config)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16", jnp.bfloat16, None])
def test_the_three_export_dtypes_are_written(tmp_path, dtype) -> None:
    model = init_model(tiny_config())
    save_pretrained(tmp_path / "out", model, model.config, dtype=dtype)
    assert (tmp_path / "out" / "model.safetensors").exists()
