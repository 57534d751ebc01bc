"""Row maxima as compare-and-select reductions on CPU: the same values as `jnp.max`, a NaN still reaching every
softmax and cross-entropy they shift, and the softmax built on them equal to `jax.nn.softmax` both ways."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from easytrain.chunked_loss import token_scores
from easytrain.models.maxima import shift_max, softmax

from runs import facts_on_eight_devices


def special_rows(dtype, shape=(6, 40)):
    """Random rows, then rows of -inf, of one +inf, of signed zeros only, of subnormals and of the largest floats."""
    info = jnp.finfo(dtype)
    x = np.random.default_rng(0).normal(0, 30, shape).astype(np.float32)
    x[1] = -np.inf
    x[2, 7] = np.inf
    x[3] = np.where(np.arange(shape[1]) % 2, 0.0, -0.0)
    x[4, :] = -float(info.max)
    x[4, 11] = float(info.smallest_subnormal)
    x[5, :] = float(info.max)
    return jnp.asarray(x, dtype)


def flushed(x, dtype):
    """`x` as float32 with subnormals of `dtype` flushed to zero, as XLA:CPU's arithmetic reads them."""
    x = np.float32(x)
    return np.where(np.abs(x) < float(jnp.finfo(dtype).tiny), 0.0, x)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16, jnp.float16])
@pytest.mark.parametrize("axis, keepdims", [(-1, False), (0, False), (1, True), (0, True)])
def test_shift_max_equals_jnp_max(dtype, axis, keepdims):
    x = special_rows(dtype)
    ours, reference = shift_max(x, axis, keepdims), jnp.max(x, axis=axis, keepdims=keepdims)
    assert ours.dtype == reference.dtype and ours.shape == reference.shape
    # XLA:CPU's `max` flushes a subnormal maximum to zero; the select returns the element itself, which every
    # later comparison or subtraction reads as zero again.
    np.testing.assert_array_equal(flushed(ours, dtype), flushed(reference, dtype))
    assert np.isin(np.float32(ours), np.float32(x)).all()
    jitted = jax.jit(shift_max, static_argnums=(1, 2))(x, axis, keepdims)
    np.testing.assert_array_equal(np.float32(jitted), np.float32(ours))


def test_shift_max_of_a_batch_under_vmap_and_of_a_middle_axis():
    x = jnp.asarray(np.random.default_rng(1).normal(size=(3, 5, 7)), jnp.float32)
    np.testing.assert_array_equal(jax.vmap(shift_max)(x), jnp.max(x, axis=-1))
    np.testing.assert_array_equal(shift_max(x, 1), jnp.max(x, axis=1))


def test_on_cpu_the_reduction_is_a_select_where_jnp_max_is_a_maximum():
    """What makes it fast on XLA:CPU (`benchmarks/maxima.py`): no NaN-propagating `maximum` in the reduction."""
    if jax.default_backend() != "cpu":
        pytest.skip("the select form is the CPU path; other platforms keep jnp.max")
    x = jnp.ones((8, 128), jnp.float32)
    ours = jax.jit(shift_max).lower(x).as_text()
    reference = jax.jit(lambda a: jnp.max(a, -1)).lower(x).as_text()
    assert "stablehlo.select" in ours and "stablehlo.maximum" not in ours
    assert "stablehlo.maximum" in reference


def test_shift_max_carries_no_gradient():
    x = jnp.asarray(np.random.default_rng(2).normal(size=(4, 9)), jnp.float32)
    np.testing.assert_array_equal(jax.grad(lambda a: jnp.sum(shift_max(a) ** 2))(x), np.zeros_like(x))


@pytest.mark.parametrize("position", [0, 17, 39])
def test_a_nan_anywhere_in_a_row_still_reaches_its_softmax_and_cross_entropy(position):
    """The select may pass a NaN over as the row's maximum, but the `exp` of the row still meets it, so a
    non-finite step is still detected (the trainer's guard reads the loss)."""
    logits = special_rows(jnp.float32).at[0, position].set(jnp.nan)
    assert np.isnan(np.asarray(softmax(logits)[0])).all()
    nll, _ = token_scores(logits, jnp.zeros((logits.shape[0],), jnp.int32) + 3)
    assert np.isnan(float(nll[0])) and np.isfinite(float(nll[3]))


def softmax_inputs():
    """Attention-like scores: random rows and a row masked to the float32 minimum but for one score."""
    x = np.random.default_rng(3).normal(0, 4, (2, 3, 5, 16)).astype(np.float32)
    x[0, 1, 2, 1:] = np.finfo(np.float32).min
    return jnp.asarray(x)


@pytest.mark.parametrize("axis", [-1, 2])
def test_softmax_and_its_derivatives_match_jax_nn_softmax(axis):
    x = softmax_inputs()
    tangent = jnp.asarray(np.random.default_rng(4).normal(size=x.shape), jnp.float32)
    np.testing.assert_allclose(softmax(x, axis), jax.nn.softmax(x, axis=axis), rtol=1e-6, atol=1e-7)
    ours, our_vjp = jax.vjp(lambda a: softmax(a, axis), x)
    _, reference_vjp = jax.vjp(lambda a: jax.nn.softmax(a, axis=axis), x)
    np.testing.assert_allclose(our_vjp(tangent)[0], reference_vjp(tangent)[0], rtol=1e-5, atol=1e-6)
    our_jvp = jax.jvp(lambda a: softmax(a, axis), (x,), (tangent,))[1]
    reference_jvp = jax.jvp(lambda a: jax.nn.softmax(a, axis=axis), (x,), (tangent,))[1]
    np.testing.assert_allclose(our_jvp, reference_jvp, rtol=1e-5, atol=1e-6)
    second = jax.grad(lambda a: jnp.sum(jax.grad(lambda b: jnp.sum(softmax(b, axis) ** 3))(a) * tangent))(x)
    reference_second = jax.grad(lambda a: jnp.sum(jax.grad(
        lambda b: jnp.sum(jax.nn.softmax(b, axis=axis) ** 3))(a) * tangent))(x)
    np.testing.assert_allclose(second, reference_second, rtol=1e-4, atol=1e-5)


SHARDED_VOCAB = """
import json
import jax, jax.numpy as jnp, numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P
from easytrain.chunked_loss import token_scores
from easytrain.models.maxima import shift_max, softmax
mesh = jax.make_mesh((2, 4), ("data", "tensor"), axis_types=(jax.sharding.AxisType.Auto,) * 2)  # as the trainer's
logits = jax.device_put(jnp.asarray(np.random.default_rng(0).normal(size=(16, 64)), jnp.float32),
                        NamedSharding(mesh, P("data", "tensor")))
targets = jnp.arange(16, dtype=jnp.int32)
with jax.set_mesh(mesh):
    in_context = jax.jit(shift_max)(logits)
nll, hits = jax.jit(token_scores)(logits, targets)
reference_nll = jax.nn.logsumexp(logits, -1) - logits[jnp.arange(16), targets]
print(json.dumps({
    "max": bool(np.array_equal(jax.jit(shift_max)(logits), np.max(np.asarray(logits), -1))),
    "max_in_mesh_context": bool(np.array_equal(in_context, np.max(np.asarray(logits), -1))),
    "softmax": bool(np.allclose(jax.jit(softmax)(logits), jax.nn.softmax(logits), rtol=1e-6, atol=1e-7)),
    "nll": bool(np.allclose(nll, reference_nll, rtol=1e-5, atol=1e-5)),
}))
"""


def test_a_maximum_over_an_axis_split_across_devices_compiles_and_agrees(tmp_path):
    """A tensor-parallel head splits the vocabulary across devices: the reduction then ends in an all-reduce,
    which XLA:CPU builds only for the standard reductions, so over several devices the maximum is `jnp.max`'s."""
    script = tmp_path / "sharded_vocab.py"
    script.write_text(SHARDED_VOCAB)
    facts = facts_on_eight_devices(script)
    assert facts == {"max": True, "max_in_mesh_context": True, "softmax": True, "nll": True}


def test_over_several_devices_in_context_the_maximum_is_jnp_max():
    """Traced under a mesh of more than one device (as the trainer traces its step), the select is not used."""
    x = jnp.ones((4, 8), jnp.float32)
    assert "reduce_max" not in str(jax.make_jaxpr(shift_max)(x))
    mesh = jax.sharding.AbstractMesh((2,), ("data",))
    with jax.sharding.use_abstract_mesh(mesh):
        assert "reduce_max" in str(jax.make_jaxpr(shift_max)(x))
