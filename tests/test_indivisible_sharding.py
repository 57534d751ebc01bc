"""Dimensions a mesh axis does not divide: such parameters are replicated, and a run says so once, naming the
config field and the fix; attention kernels are split only at whole heads; mesh sizes must be positive or -1."""

import logging
from pathlib import Path

import jax
import pytest
from flax import nnx
from jax.sharding import AbstractMesh

from easytrain import indivisible, sharding
from easytrain.errors import ArgumentError
from easytrain.models.llama import LlamaForCausalLM
from model_configs import tiny_config
from runs import facts_on_eight_devices

WORKER = Path(__file__).resolve().parent / "workers" / "indivisible_heads.py"


@pytest.fixture
def fresh_warnings(monkeypatch, caplog):
    """The once-per-run warnings reset, and the easytrain log captured at WARNING."""
    monkeypatch.setattr(sharding, "_WARNED_MESH_AXES", set())
    monkeypatch.setattr(indivisible, "_WARNED_INDIVISIBLE", set())
    caplog.set_level(logging.WARNING, logger="easytrain")
    return caplog


def abstract_params(**config) -> nnx.State:
    fields = dict(num_hidden_layers=1) | config
    with nnx.use_eager_sharding(False):
        model = nnx.eval_shape(lambda: LlamaForCausalLM(tiny_config(**fields), rngs=nnx.Rngs(0)))
    return nnx.state(model, nnx.Param)


def specs(params: nnx.State, mesh) -> dict[str, str]:
    tree = sharding.param_shardings(params, mesh)
    return {jax.tree_util.keystr(path, simple=True, separator="."): tuple(leaf.spec)
            for path, leaf in jax.tree_util.tree_leaves_with_path(tree)}


def test_fsdp_that_divides_no_hidden_dimension_is_warned_once_with_a_summary(fresh_warnings):
    params = abstract_params(hidden_size=100, num_attention_heads=4, num_key_value_heads=2, head_dim=26,
                             intermediate_size=200)
    mesh = AbstractMesh((1, 8, 1), sharding.MESH_AXES)
    placed = specs(params, mesh)
    specs(params, mesh)  # a second placement in the same run (the optimizer, a reload) says nothing new
    assert all("fsdp" not in str(spec) for spec in placed.values()), placed
    warned = [record.getMessage() for record in fresh_warnings.records]
    assert len(warned) == 1, warned
    total = sum(leaf.size * leaf.dtype.itemsize for leaf in jax.tree.leaves(params))
    for part in ("fsdp_size=8", "hidden_size", f"{total:,} bytes", "embed_tokens.embedding", "100"):
        assert part in warned[0], (part, warned[0])


def test_vocabulary_tensor_parallelism_does_not_divide_is_named_with_padding_advice(fresh_warnings):
    params = abstract_params(vocab_size=1001, num_attention_heads=8, num_key_value_heads=8, head_dim=8)
    placed = specs(params, AbstractMesh((1, 1, 8), sharding.MESH_AXES))
    assert placed["embed_tokens.embedding"] == (None, None) and placed["lm_head.kernel"] == (None, None)
    assert placed["layers.0.mlp.up_proj.kernel"] == (None, "tensor")
    warned = [record.getMessage() for record in fresh_warnings.records]
    assert len(warned) == 1, warned
    for part in ("tensor_parallel_size=8", "vocab_size", "1001", "multiple of 8", "lm_head.kernel"):
        assert part in warned[0], (part, warned[0])


def test_attention_kernels_split_only_at_whole_heads(fresh_warnings):
    config = dict(hidden_size=96, num_attention_heads=6, num_key_value_heads=2, head_dim=16)
    placed = specs(abstract_params(**config), AbstractMesh((1, 1, 4), sharding.MESH_AXES))
    for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
        assert "tensor" not in str(placed[f"layers.0.self_attn.{name}.kernel"]), (name, placed)
    assert placed["layers.0.mlp.up_proj.kernel"] == (None, "tensor")
    warned = [record.getMessage() for record in fresh_warnings.records]
    assert len(warned) == 1 and "num_attention_heads" in warned[0] and "num_key_value_heads" in warned[0], warned
    # Heads that divide are split as before, at whole heads: 8 heads of 12 over tensor=4.
    config = dict(hidden_size=96, num_attention_heads=8, num_key_value_heads=4, head_dim=12)
    placed = specs(abstract_params(**config), AbstractMesh((1, 1, 4), sharding.MESH_AXES))
    assert placed["layers.0.self_attn.q_proj.kernel"] == (None, "tensor")
    assert placed["layers.0.self_attn.o_proj.kernel"] == ("tensor", None)


def test_indivisible_heads_train_as_on_one_device_without_gathering_kernels():
    facts = facts_on_eight_devices(WORKER)
    one, four = facts["one"], facts["four"]
    assert four["all_gathers"] == 0, four
    assert all("tensor" not in spec for spec in four["specs"].values()), four["specs"]
    assert len(four["losses"]) == len(one["losses"]) == 3
    assert four["losses"] == pytest.approx(one["losses"], rel=1e-5)


@pytest.mark.parametrize("sizes, field", [((-1, 0, 1), "fsdp_size"), ((-1, -2, 1), "fsdp_size"),
                                          ((2, 2, -2), "tensor_parallel_size"), ((0, 1, 1), "data_parallel_size")])
def test_mesh_sizes_must_be_positive_or_minus_one(sizes, field):
    with pytest.raises(ArgumentError, match="must be a positive size or -1") as raised:
        sharding.resolve_mesh_shape(dict(zip(sharding.MESH_AXES, sizes)), 8)
    assert raised.value.field == field
    with pytest.raises(ArgumentError, match=field):
        sharding.make_mesh(*sizes, devices=jax.devices()[:1])
