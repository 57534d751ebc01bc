"""Behaviour of the NNX Llama model: masking, packing, dtypes, annotations."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx, traverse_util

from easytrain.models import ConfigError, LlamaForCausalLM, UnsupportedConfigError, init_model

from model_configs import VOCAB, tiny_config


@pytest.fixture(scope="module")
def model() -> LlamaForCausalLM:
    return init_model(tiny_config(attention_bias=True, mlp_bias=True), seed=0)


@nnx.jit
def forward(model: LlamaForCausalLM, ids_BT: jax.Array, **kwargs) -> jax.Array:
    return model(ids_BT, **kwargs)


def random_ids(batch: int, length: int, seed: int = 0) -> jax.Array:
    return jnp.asarray(np.random.RandomState(seed).randint(0, VOCAB, (batch, length)))


def param_paths(model: nnx.Module) -> dict[tuple, jax.Array]:
    return traverse_util.flatten_dict(nnx.to_pure_dict(nnx.state(model, nnx.Param)))


def test_logits_shape_and_dtype(model):
    logits_BTV = forward(model, random_ids(2, 7))
    assert logits_BTV.shape == (2, 7, VOCAB)
    assert logits_BTV.dtype == jnp.float32
    assert model.config.vocab_size == VOCAB


def test_future_tokens_do_not_change_past_logits(model):
    ids_BT = random_ids(2, 10)
    changed_BT = ids_BT.at[:, 6].set((ids_BT[:, 6] + 1) % VOCAB)
    before, after = forward(model, ids_BT), forward(model, changed_BT)
    np.testing.assert_array_equal(before[:, :6], after[:, :6])
    assert not np.allclose(before[:, 6:], after[:, 6:])


def test_right_padding_keeps_real_token_logits(model):
    ids_BT = random_ids(1, 6)
    padded_BT = jnp.concatenate([ids_BT, random_ids(1, 4, seed=1)], axis=1)
    mask_BT = jnp.array([[1] * 6 + [0] * 4])
    expected = forward(model, ids_BT)
    actual = forward(model, padded_BT, attention_mask_BT=mask_BT)
    np.testing.assert_allclose(actual[:, :6], expected, atol=1e-5)


def test_packed_segments_match_separate_sequences(model):
    lengths = (3, 5, 4)
    pieces = [random_ids(1, n, seed=i)[0] for i, n in enumerate(lengths)]
    packed_BT = jnp.concatenate([*pieces, jnp.zeros(2, jnp.int32)])[None]
    segments_BT = jnp.array([sum(([i + 1] * n for i, n in enumerate(lengths)), []) + [0, 0]])
    positions_BT = jnp.array([sum((list(range(n)) for n in lengths), []) + [0, 0]])
    packing = dict(attention_mask_BT=segments_BT > 0, segment_ids_BT=segments_BT, positions_BT=positions_BT)
    packed = forward(model, packed_BT, **packing)
    # One sequence per row, right-padded to a common length (padding is tested on its own above).
    alone_BT = jnp.stack([jnp.pad(piece, (0, 5 - piece.shape[0])) for piece in pieces])
    alone = forward(model, alone_BT, attention_mask_BT=jnp.arange(5)[None] < jnp.array(lengths)[:, None])
    starts = np.cumsum((0,) + lengths)
    for row, (start, length) in enumerate(zip(starts, lengths)):
        np.testing.assert_allclose(packed[0, start : start + length], alone[row, :length], atol=1e-5)


def test_fully_masked_rows_are_finite_in_forward_and_gradient(model):
    ids_BT = random_ids(2, 8)
    mask_BT = jnp.array([[0, 0, 0, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0, 0, 0]])

    def loss(m: LlamaForCausalLM) -> jax.Array:
        return jnp.sum(m(ids_BT, attention_mask_BT=mask_BT) * mask_BT[..., None])

    assert np.isfinite(forward(model, ids_BT, attention_mask_BT=mask_BT)).all()
    grads = nnx.jit(nnx.grad(loss))(model)
    assert all(np.isfinite(g).all() for g in jax.tree.leaves(grads))


def test_bfloat16_compute_with_float32_params():
    config = tiny_config()
    reference = init_model(config, seed=1)
    mixed = init_model(config, seed=1, dtype=jnp.bfloat16)
    assert {p.dtype for p in param_paths(mixed).values()} == {jnp.dtype(jnp.float32)}
    ids_BT = random_ids(2, 8)
    logits_BTV = forward(mixed, ids_BT)
    assert logits_BTV.dtype == jnp.float32
    np.testing.assert_allclose(logits_BTV, forward(reference, ids_BT), atol=2e-2)


def test_bfloat16_params_are_stored_in_bfloat16():
    def build() -> LlamaForCausalLM:
        return LlamaForCausalLM(tiny_config(), param_dtype=jnp.bfloat16, rngs=nnx.Rngs(0))

    with nnx.use_eager_sharding(False):
        model = nnx.eval_shape(build)
    assert {p.dtype for p in param_paths(model).values()} == {jnp.dtype(jnp.bfloat16)}


EXPECTED_AXES = {
    "embedding": ("vocab", "embed"),
    "lm_head/kernel": ("embed", "vocab"),
    "q_proj/kernel": ("embed", "heads"),
    "k_proj/kernel": ("embed", "heads"),
    "v_proj/kernel": ("embed", "heads"),
    "o_proj/kernel": ("heads", "embed"),
    "gate_proj/kernel": ("embed", "mlp"),
    "up_proj/kernel": ("embed", "mlp"),
    "down_proj/kernel": ("mlp", "embed"),
    "q_proj/bias": ("heads",),
    "k_proj/bias": ("heads",),
    "v_proj/bias": ("heads",),
    "o_proj/bias": ("embed",),
    "gate_proj/bias": ("mlp",),
    "up_proj/bias": ("mlp",),
    "down_proj/bias": ("embed",),
    "scale": ("norm",),
}


def test_every_param_has_logical_axes_of_its_rank(model):
    state = nnx.state(model, nnx.Param)
    specs = traverse_util.flatten_dict(nnx.to_pure_dict(nnx.get_partition_spec(state)))
    values = param_paths(model)
    assert specs.keys() == values.keys()
    for path, spec in specs.items():
        name = "/".join(map(str, path))
        expected = next(axes for suffix, axes in EXPECTED_AXES.items() if name.endswith(suffix))
        assert tuple(spec) == expected, name
        assert len(spec) == values[path].ndim, name


def test_parameter_names_and_initialisation():
    config = tiny_config(attention_bias=True, tie_word_embeddings=True, initializer_range=0.05)
    params = {"/".join(map(str, k)): v for k, v in param_paths(init_model(config)).items()}
    assert "lm_head/kernel" not in params
    assert params["layers/1/self_attn/q_proj/kernel"].shape == (64, 64)
    assert params["layers/1/self_attn/k_proj/kernel"].shape == (64, 32)
    for name, value in params.items():
        if name.endswith("scale"):
            np.testing.assert_array_equal(value, 1.0)
        elif name.endswith("bias"):
            np.testing.assert_array_equal(value, 0.0)
        else:
            assert abs(float(jnp.std(value)) - 0.05) < 0.005, name


def test_graphdef_is_hashable_for_jit_caching(model):
    graphdef, _ = nnx.split(model)
    assert hash(graphdef) == hash(nnx.split(init_model(model.config, seed=3))[0])


@pytest.mark.parametrize(
    "overrides, field",
    [
        ({"rope_parameters": {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 1e4}}, "rope_type"),
        ({"hidden_act": "relu2"}, "hidden_act"),
    ],
)
def test_unsupported_config_is_rejected(overrides, field):
    with pytest.raises(UnsupportedConfigError, match=field) as error:
        init_model(tiny_config(**overrides))
    assert isinstance(error.value, NotImplementedError) and isinstance(error.value, ValueError)


def test_query_heads_must_group_evenly_over_key_value_heads():
    with pytest.raises(ConfigError, match="num_key_value_heads"):
        init_model(tiny_config(num_attention_heads=4, num_key_value_heads=3))


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="the stacked tables are XLA:CPU's path only")
def test_the_rotary_tables_are_computed_once_per_step_on_cpu():
    """XLA:CPU fuses `cos` and `sin` into every consumer unless told otherwise: each layer's query and key rotation,
    forward and backward, recomputed them per head (about 5% of the benchmark Llama's step)."""
    model = init_model(tiny_config(num_hidden_layers=3), seed=0)
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    def loss(params, ids_BT):
        return jnp.sum(nnx.merge(graphdef, params, rest)(ids_BT) ** 2)

    hlo = jax.jit(jax.grad(loss)).lower(params, random_ids(2, 16)).compile().as_text()
    assert (hlo.count(" sine("), hlo.count(" cosine(")) == (1, 1)


def test_a_batch_without_positions_computes_one_row_of_rotary_tables(model):
    """Every row of a batch without `positions` sits at 0..T-1: the tables are built for one row and broadcast
    over the batch (the benchmark Llama's table kernel 2.21 -> 0.15 ms per step), with the logits of explicit
    positions to the bit."""
    ids_BT = random_ids(4, 9)
    jaxpr = jax.make_jaxpr(lambda ids: model(ids))(ids_BT)
    shapes = [eqn.invars[0].aval.shape for eqn in jaxpr.jaxpr.eqns if eqn.primitive.name in ("cos", "sin")]
    assert shapes and all(shape[0] == 1 for shape in shapes), shapes
    positions_BT = jnp.broadcast_to(jnp.arange(9), (4, 9))
    np.testing.assert_array_equal(forward(model, ids_BT), forward(model, ids_BT, positions_BT=positions_BT))
