"""`from_pretrained` where users call it: inside `with jax.set_mesh(mesh):`, and (refused by name, with the fix)
inside a trace such as a `Frozen` builder, which would bake every weight into the program as a constant."""

import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from flax import nnx

from easytrain import sharding
from easytrain.frozen import Frozen, place_frozen
from easytrain.models import CheckpointError, from_pretrained, init_model, save_pretrained

sys.path.insert(0, str(Path(__file__).resolve().parent))
from model_configs import tiny_config  # noqa: E402


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    config = tiny_config()
    directory = tmp_path_factory.mktemp("llama")
    save_pretrained(directory, init_model(config, seed=3), config)
    return directory


def params_of(model) -> dict:
    return jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(model, nnx.Param)))


def test_loads_under_an_active_mesh(checkpoint):
    expected = params_of(from_pretrained(checkpoint))
    mesh = sharding.make_mesh(data=-1, fsdp=1, tensor=1)
    with jax.set_mesh(mesh):
        plain, placed = from_pretrained(checkpoint), from_pretrained(checkpoint, mesh=mesh)
        built = init_model(tiny_config(), seed=3)
    for model in (plain, placed, built):
        jax.tree.map(np.testing.assert_array_equal, params_of(model), expected)
    assert placed.embed_tokens.embedding.get_value().sharding.mesh.shape == mesh.shape


@pytest.mark.parametrize("trace", [lambda build: jax.jit(build)(), nnx.eval_shape], ids=["jit", "eval_shape"])
def test_refused_inside_a_trace_naming_the_fix(checkpoint, trace):
    with pytest.raises(CheckpointError, match=r"inside a trace.*Frozen\(from_pretrained\(path, mesh="):
        trace(lambda: nnx.state(from_pretrained(checkpoint), nnx.Param))


def test_a_frozen_builder_that_loads_is_refused_before_anything_is_read(checkpoint):
    mesh = sharding.make_mesh(data=-1, fsdp=1, tensor=1)
    with pytest.raises(CheckpointError, match="Frozen"):
        place_frozen({"teacher": Frozen(lambda: from_pretrained(checkpoint), checkpoint=False)}, mesh,
                     sharding.DEFAULT_RULES)
    loaded = place_frozen({"teacher": Frozen(from_pretrained(checkpoint, mesh=mesh), checkpoint=False)}, mesh,
                          sharding.DEFAULT_RULES)  # the fix the message names
    assert set(loaded.values) == {"teacher"}
