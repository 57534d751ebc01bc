"""A module computes in the dtype it was built with, whatever `--dtype` says: one computing in float16 (which needs
loss scaling easytrain does not do) is refused as `--dtype float16` is, and one computing in another dtype than
`--dtype` is warned about, since `trainer.dtype`, the saved arguments and the resume and DPO reference checks follow
the argument. bfloat16 master weights (`param_dtype`) lose small updates and keep the optimizer state in bfloat16:
warned about once, with the fix."""

import logging

import jax.numpy as jnp
import pytest
from flax import nnx

from easytrain import ArgumentError, TrainingArguments, argument_checks, placement
from easytrain.models.llama import init_model
from easytrain.models.presets import llama_config
from test_custom_module_errors import MLP, Classifier, arguments, with_hook


def _module(dtype, param_dtype=jnp.float32) -> MLP:
    with nnx.use_eager_sharding(False):  # built outside any mesh, as a caller builds it
        return MLP(nnx.Rngs(0), dtype, param_dtype)


def _dtype_messages(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if "dtype" in r.getMessage()]


def test_compute_dtypes_are_the_submodules_dtype_attributes() -> None:
    assert placement.compute_dtypes(_module(jnp.bfloat16)) == {jnp.dtype("bfloat16")}
    assert placement.compute_dtypes(_module(None)) == set()  # None: computes in its inputs' dtype
    llama = placement.abstract_module(lambda: init_model(llama_config("tiny", vocab_size=64), dtype=jnp.float16))
    assert placement.compute_dtypes(llama) == {jnp.dtype("float16")}


def test_a_given_module_computing_in_float16_is_refused(tmp_path) -> None:
    trainer = Classifier(arguments(tmp_path), model=_module(jnp.float16))
    with pytest.raises(ArgumentError, match=r"^dtype: .*model=.*float16.*l1.*loss scaling.*bfloat16"):
        trainer.setup()


def test_a_created_module_computing_in_float16_is_refused(tmp_path) -> None:
    trainer = with_hook("create_module", lambda self: MLP(nnx.Rngs(0), jnp.float16))(arguments(tmp_path))
    with pytest.raises(ArgumentError, match=r"^dtype: .*create_module.*float16.*loss scaling"):
        trainer.setup()


def test_a_given_module_computing_in_another_dtype_is_warned_about(tmp_path, caplog) -> None:
    with caplog.at_level(logging.WARNING, logger="easytrain"):
        trainer = Classifier(arguments(tmp_path), model=_module(jnp.bfloat16))
        trainer.setup()
    warned = [m for m in _dtype_messages(caplog) if "computes in" in m]
    assert len(warned) == 1, _dtype_messages(caplog)
    assert "model=" in warned[0] and "--dtype bfloat16" in warned[0] and "trainer.dtype" in warned[0], warned
    assert trainer.dtype == jnp.float32  # the argument's, as the warning says


def test_a_created_module_computing_in_another_dtype_is_warned_about(tmp_path, caplog) -> None:
    created = with_hook("create_module", lambda self: MLP(nnx.Rngs(0), jnp.bfloat16))
    with caplog.at_level(logging.WARNING, logger="easytrain"):
        created(arguments(tmp_path)).setup()
    warned = [m for m in _dtype_messages(caplog) if "computes in" in m]
    assert len(warned) == 1 and "create_module" in warned[0] and "--dtype bfloat16" in warned[0], warned


@pytest.mark.parametrize("given", [True, False])
def test_a_float32_module_under_float32_is_neither_refused_nor_warned_about(tmp_path, caplog, given) -> None:
    trainer_class = Classifier if given else with_hook("create_module", lambda self: MLP(nnx.Rngs(0), self.dtype))
    with caplog.at_level(logging.WARNING, logger="easytrain"):
        trainer = trainer_class(arguments(tmp_path), **(dict(model=_module(jnp.float32)) if given else {}))
        trainer.setup()
    assert not _dtype_messages(caplog)


@pytest.fixture
def fresh_warnings():
    argument_checks.warn_bfloat16_state.cache_clear()  # one warning per process for the same settings
    yield
    argument_checks.warn_bfloat16_state.cache_clear()


@pytest.mark.parametrize("optimizer, lost", [("adamw", "adam_beta2=0.999 is 1.0"), ("lion", "momentum"),
                                             ("sgd", "momentum"), ("adafactor", "second-moment")])
def test_bfloat16_master_weights_are_warned_about_once(tmp_path, caplog, fresh_warnings, optimizer, lost) -> None:
    with caplog.at_level(logging.WARNING, logger="easytrain"):
        for _ in range(2):
            TrainingArguments(output_dir=str(tmp_path), param_dtype="bfloat16", optimizer=optimizer, sgd_momentum=0.9)
    warned = [r.getMessage() for r in caplog.records if "param_dtype" in r.getMessage()]
    assert len(warned) == 1, warned
    assert "rounded away" in warned[0] and lost in warned[0] and "--param_dtype float32" in warned[0], warned


def test_float32_master_weights_are_not_warned_about(tmp_path, caplog, fresh_warnings) -> None:
    with caplog.at_level(logging.WARNING, logger="easytrain"):
        TrainingArguments(output_dir=str(tmp_path), param_dtype="float32", dtype="bfloat16")
    assert not [r for r in caplog.records if "param_dtype" in r.getMessage()]
