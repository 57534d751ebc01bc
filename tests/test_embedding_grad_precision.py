"""A bfloat16 embedding table's gradient is summed over every token in float32 and rounded once.

A token used thousands of times in a batch adds thousands of terms into its gradient row; summed in
bfloat16 the row drifts far from the true sum (37% off at 2096 uses), so the lookup's backward must
accumulate in float32 whatever the parameter dtype.
"""

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from model_configs import tiny_config

from easytrain.losses import causal_lm_loss
from easytrain.models import init_model
from easytrain.models.layers import Embedding

FREQUENT = 5


def frequent_ids(count: int, vocab: int, seed: int = 0) -> np.ndarray:
    """`count` token ids, about half of them `FREQUENT`, the rest uniform over `vocab`."""
    rs = np.random.RandomState(seed)
    return np.where(rs.rand(count) < 0.5, FREQUENT, rs.randint(0, vocab, count))


def embedding(param_dtype) -> Embedding:
    with nnx.use_eager_sharding(False):
        return Embedding(64, 32, std=0.02, dtype=jnp.bfloat16, param_dtype=param_dtype, rngs=nnx.Rngs(0))


@pytest.mark.parametrize("param_dtype", [jnp.bfloat16, jnp.float32])
def test_embedding_gradient_is_the_float64_sum_rounded_once(param_dtype):
    ids = frequent_ids(4096, 64)
    cotangent = jnp.asarray(np.random.RandomState(1).randn(4096, 32) / 64, jnp.bfloat16)
    table = embedding(param_dtype)
    grad = nnx.grad(lambda m: jnp.sum(m(jnp.asarray(ids)).astype(jnp.float32) * cotangent))(table)
    exact = np.zeros((64, 32))
    np.add.at(exact, ids, np.asarray(cotangent, np.float64))
    got = np.asarray(grad.embedding[...], np.float64)
    assert grad.embedding[...].dtype == param_dtype
    # The gradient leaves the lookup in the compute dtype (bfloat16) whatever the parameter dtype: one
    # rounding (relative 2**-8) of a float32 sum. Summed in bfloat16, 2000 terms drift far further.
    np.testing.assert_allclose(got, exact, rtol=2**-8, atol=1e-7)


def test_embedding_lookup_is_the_table_rows():
    table = embedding(jnp.bfloat16)
    ids = jnp.asarray(frequent_ids(256, 64))
    rows = table(ids)
    assert rows.dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(rows, np.float32), np.asarray(table.embedding[...][ids], np.float32))


def loss_grad(tied: bool, param_dtype, ids_BT: np.ndarray) -> np.ndarray:
    """The embedding table's gradient of the mean next-token loss, bfloat16 compute, weights bfloat16-exact."""
    model = init_model(tiny_config(tie_word_embeddings=tied), seed=1, dtype=jnp.bfloat16, param_dtype=param_dtype)
    batch = {"input_ids": jnp.asarray(ids_BT), "targets": jnp.asarray(np.roll(ids_BT, -1, 1)),
             "loss_mask": jnp.ones(ids_BT.shape, jnp.int32)}

    def loss(m):
        out = causal_lm_loss(m, batch, None, True)
        return out.loss_sum / out.count

    return np.asarray(nnx.grad(loss)(model).embed_tokens.embedding[...], np.float64)


@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
def test_bfloat16_parameters_get_the_float32_parameters_gradient_rounded(tied):
    # init_model draws in float32 and rounds, so the float32 model's weights are its bfloat16 twin's
    # rounded up again: both compute the same bfloat16 forward, and their gradients should differ only
    # by the final rounding to bfloat16 (two roundings where the tied head's gradient is added).
    ids_BT = frequent_ids(64 * 64, 128).reshape(64, 64)
    reference = loss_grad(tied, jnp.float32, ids_BT)
    got = loss_grad(tied, jnp.bfloat16, ids_BT)
    row_error = np.linalg.norm(got - reference, axis=1) / np.linalg.norm(reference, axis=1)
    assert row_error[FREQUENT] < 2**-7, f"row {FREQUENT} off by {row_error[FREQUENT]:.3f}"
    assert row_error.max() < 2**-7
