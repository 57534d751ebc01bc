"""A module passed as `model=` is checked against `param_dtype` as one `create_module` builds is: the trainer
trains it in the dtypes it was built with, so a run asking for bfloat16 storage would silently keep float32."""

import logging

import jax
import jax.numpy as jnp
from flax import nnx

from test_custom_module_errors import MLP, Classifier, arguments


def _module(*dtypes) -> MLP:
    with nnx.use_eager_sharding(False):  # built outside any mesh, as a caller builds it
        return MLP(nnx.Rngs(0), *dtypes)


def _param_dtype_warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if "param_dtype is" in r.getMessage()]


def test_a_given_module_that_ignores_param_dtype_is_warned_about(tmp_path, caplog) -> None:
    with caplog.at_level(logging.WARNING, logger="easytrain"):
        Classifier(arguments(tmp_path, dtype="bfloat16", param_dtype="bfloat16"), model=_module()).setup()
    warned = _param_dtype_warnings(caplog)
    assert len(warned) == 1, warned
    assert "l1.kernel" in warned[0] and "model=" in warned[0] and "param_dtype=" in warned[0], warned


def test_a_given_module_in_param_dtype_is_not_warned_about(tmp_path, caplog) -> None:
    model = _module(jnp.bfloat16, jnp.bfloat16)
    with caplog.at_level(logging.WARNING, logger="easytrain"):
        trainer = Classifier(arguments(tmp_path, dtype="bfloat16", param_dtype="bfloat16"), model=model)
        trainer.setup()
    assert {leaf.dtype for leaf in jax.tree.leaves(trainer.state.params)} == {jnp.dtype("bfloat16")}
    assert not _param_dtype_warnings(caplog)
