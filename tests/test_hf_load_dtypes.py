"""from_pretrained's dtype and param_dtype are checked before anything is read: a name numpy does not know ('bf16')
raised a TypeError naming no argument (or, as dtype, was kept by the model until its first forward), and an
integer param_dtype rounded every weight to an integer without a word."""

from __future__ import annotations

import jax.numpy as jnp
import pytest

from easytrain.models import CheckpointError, from_pretrained, init_model, save_pretrained

from model_configs import tiny_config


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    model = init_model(tiny_config())
    return save_pretrained(tmp_path_factory.mktemp("dtypes") / "model", model, model.config)


@pytest.mark.parametrize("field, value, match", [
    ("param_dtype", "bf16", "param_dtype='bf16' is not a dtype"),  # was TypeError: data type 'bf16' not understood
    ("dtype", "bf16", "dtype='bf16' is not a dtype"),  # was: loaded
    ("param_dtype", "int8", "param_dtype='int8' is not a floating dtype"),  # was: loaded, every weight 0 or +-1
    ("param_dtype", jnp.bool_, "param_dtype=.*bool.* is not a floating dtype"),
])
def test_a_dtype_that_cannot_hold_the_weights_is_refused_by_name(checkpoint, field, value, match):
    with pytest.raises(CheckpointError, match=match):
        from_pretrained(checkpoint, **{field: value})


def test_dtype_names_and_float_dtypes_load(checkpoint):
    model = from_pretrained(checkpoint, dtype="bfloat16", param_dtype="bfloat16")
    assert model.layers[0].mlp.down_proj.kernel.value.dtype == jnp.bfloat16
