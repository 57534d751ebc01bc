"""`causal_grouped_attention`: query blocks scored only against the keys up to their end give
`grouped_attention`'s values and gradients at every position, padding included; the "xla" path uses them
from `BLOCKED_FROM` tokens on."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from easytrain.models import init_model, masks
from easytrain.models.attention import attention_mask, causal_grouped_attention, grouped_attention
from jaxprs import all_equations
from model_configs import VOCAB, tiny_config

B, T, N, G, K = 3, 16, 2, 2, 8


def mask_case(name: str) -> jax.Array:
    """A dense ``[B, T, S]`` mask as the model builds it, for one masking case."""
    lengths_B = np.array([16, 11, 5])
    real_BT = (np.arange(T)[None, :] < lengths_B[:, None]).astype(np.int32)
    if name == "causal":
        return attention_mask(B, T)
    if name == "right_padding":
        return attention_mask(B, T, jnp.asarray(real_BT))
    if name == "left_padding":  # queries before a row's first token see no key at all
        return attention_mask(B, T, jnp.asarray(real_BT[:, ::-1].copy()))
    if name == "packing":
        segments_BT = np.array([[1] * 6 + [2] * 7 + [0] * 3, [1] * 16, [1] * 3 + [2] * 3 + [3] * 10])
        return attention_mask(B, T, jnp.asarray((segments_BT > 0).astype(np.int32)), jnp.asarray(segments_BT))
    if name == "sliding_window":
        return attention_mask(B, T, jnp.asarray(real_BT), sliding_window=5)
    raise ValueError(name)


def values_and_grads(attention, mask_BTS):
    rng = np.random.RandomState(0)
    q, k, v = (jnp.asarray(rng.randn(*shape), jnp.float32) for shape in ((B, T, N, G, K), (B, T, N, K), (B, T, N, K)))
    weights = jnp.asarray(rng.randn(B, T, N, G, K), jnp.float32)

    def loss(q, k, v):
        out = attention(q, k, v, mask_BTS)
        return jnp.sum(out * weights), out

    (_, out), grads = jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True)(q, k, v)
    return out, grads


@pytest.mark.parametrize("name", ["causal", "right_padding", "left_padding", "packing", "sliding_window"])
@pytest.mark.parametrize("query_blocks", [2, 4, 3])  # 3 does not divide 16: one block, unchanged
def test_query_blocks_equal_the_full_scores(name, query_blocks):
    mask_BTS = mask_case(name)
    expected = values_and_grads(grouped_attention, mask_BTS)
    blocked = values_and_grads(lambda *a: causal_grouped_attention(*a, query_blocks=query_blocks), mask_BTS)
    for want, got in zip(jax.tree.leaves(expected), jax.tree.leaves(blocked), strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def score_shapes(model, ids_BT) -> set[tuple[int, ...]]:
    """Shapes of the float32 4-D products (scores ``[B, N, G*Q, S]``, values ``[B, N, G*Q, K]``) in a fresh trace
    of the forward pass (a new function each call: no cached trace)."""
    jaxpr = jax.make_jaxpr(lambda ids: model(ids))(ids_BT).jaxpr
    return {tuple(eqn.outvars[0].aval.shape) for eqn in all_equations(jaxpr)
            if eqn.primitive.name == "dot_general" and eqn.outvars[0].aval.dtype == jnp.float32
            and eqn.outvars[0].aval.ndim == 4}


def test_the_model_scores_query_blocks_from_blocked_from_tokens_with_the_same_values_and_grads(monkeypatch):
    length = masks.BLOCKED_FROM
    ids_BT = jnp.asarray(np.random.RandomState(1).randint(0, VOCAB, (2, length)))
    real_BT = jnp.asarray((np.arange(length)[None, :] >= np.array([[0], [40]])).astype(np.int32))  # left padding
    model = init_model(tiny_config(), seed=0)
    half = length // masks.QUERY_BLOCKS
    shapes = score_shapes(model, ids_BT)
    assert (2, 2, 2 * half, half) in shapes and (2, 2, 2 * half, length) in shapes  # [B, N, G*Q, S] per block
    assert (2, 2, 2 * length, length) not in shapes

    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    weights_BTV = jnp.asarray(np.random.RandomState(2).randn(2, length, VOCAB), jnp.float32)

    def run():
        def loss(p):
            logits = nnx.merge(graphdef, p, rest)(ids_BT, attention_mask_BT=real_BT)
            return jnp.sum(logits * weights_BTV), logits

        return jax.value_and_grad(loss, has_aux=True)(params)

    (_, blocked_logits), blocked_grads = run()
    monkeypatch.setattr(masks, "QUERY_BLOCKS", 1)
    assert (2, 2, 2 * length, length) in score_shapes(model, ids_BT)
    (_, full_logits), full_grads = run()
    np.testing.assert_allclose(blocked_logits, full_logits, rtol=1e-5, atol=1e-5)
    for got, want in zip(jax.tree.leaves(blocked_grads), jax.tree.leaves(full_grads), strict=True):
        # float32 sums in another order: rounding scales with the gradient's largest entries (some reach 55)
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=max(1e-5, 1e-6 * float(np.abs(want).max())))
