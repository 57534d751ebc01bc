"""The placement warnings (a dimension a mesh axis does not divide, a mesh axis that splits no parameter) are given for
every run in a process whose finding differs: a second trainer in the same notebook or sweep, on another mesh, is
warned about its own replicated parameters. One set-up placing the same parameters again (the optimizer's, a reload,
layers loaded one by one then stacked) says nothing new. No test here resets the warnings' memory."""

import logging

from flax import nnx
from jax.sharding import AbstractMesh

from easytrain import sharding
from easytrain.models.llama import LlamaForCausalLM
from model_configs import tiny_config


def abstract_params(**config) -> nnx.State:
    with nnx.use_eager_sharding(False):
        model = nnx.eval_shape(lambda: LlamaForCausalLM(tiny_config(num_hidden_layers=1, **config),
                                                        rngs=nnx.Rngs(0)))
    return nnx.state(model, nnx.Param)


def tensor_mesh(size: int) -> AbstractMesh:
    return AbstractMesh((1, 1, size), sharding.MESH_AXES)


def replicated_warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.getMessage().startswith("Parameters replicated")]


def test_each_mesh_of_a_process_is_warned_about_the_parameters_it_replicates(caplog):
    # vocab_size 19 and 2 key-value heads: neither tensor=8 nor tensor=4 divides them (this test's own finding,
    # so another test of the same process cannot have warned it already).
    params = abstract_params(vocab_size=19, num_attention_heads=8, num_key_value_heads=2, head_dim=8)
    with caplog.at_level(logging.WARNING, logger="easytrain"):
        sharding.param_shardings(params, tensor_mesh(8))  # the first trainer
        sharding.param_shardings(params, tensor_mesh(8))  # its optimizer state, or a reload: nothing new
        first = replicated_warnings(caplog)
        sharding.param_shardings(params, tensor_mesh(4))  # a second trainer in the same process
        sharding.param_shardings(params, tensor_mesh(4))
    warned = replicated_warnings(caplog)
    assert len(first) == 1 and "tensor_parallel_size=8" in first[0], first
    assert len(warned) == 2, warned
    for part in ("tensor_parallel_size=4", "vocab_size 19", "num_key_value_heads 2", "multiple of 4 (20)"):
        assert part in warned[1], (part, warned[1])


def test_another_model_on_the_same_mesh_is_warned_about_its_own_dimensions(caplog):
    with caplog.at_level(logging.WARNING, logger="easytrain"):
        sharding.param_shardings(abstract_params(vocab_size=21, num_key_value_heads=4, head_dim=8), tensor_mesh(8))
        sharding.param_shardings(abstract_params(vocab_size=23, num_key_value_heads=4, head_dim=8), tensor_mesh(8))
    warned = replicated_warnings(caplog)
    assert len(warned) == 2 and "vocab_size 21" in warned[0] and "vocab_size 23" in warned[1], warned


def unannotated(width: int) -> nnx.State:
    with nnx.use_eager_sharding(False):
        module = nnx.eval_shape(lambda: nnx.Linear(width, width, rngs=nnx.Rngs(0)))
    return nnx.state(module, nnx.Param)


def test_each_mesh_of_a_process_is_warned_when_it_splits_no_parameter(caplog):
    params = unannotated(24)
    with caplog.at_level(logging.WARNING, logger="easytrain"):
        for fsdp in (4, 4, 2, 2):  # two trainers, each placing its parameters twice
            sharding.param_shardings(params, AbstractMesh((1, fsdp, 1), sharding.MESH_AXES))
    warned = [r.getMessage() for r in caplog.records if "is split over the mesh axis 'fsdp'" in r.getMessage()]
    assert [m.split(",")[0] for m in warned] == ["fsdp_size=4", "fsdp_size=2"], warned
