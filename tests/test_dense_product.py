"""`dense_product`: `x @ w` whose weight gradient is computed from `x^T` written out on one CPU device, where the
kernel has more inputs than outputs; the same values and derivatives as `jnp.dot` in every mode of
differentiation, and no product computed for a tangent that is zero."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from easytrain.models import dense_product as module
from easytrain.models.dense_product import dense_product
from jaxprs import all_equations

rng = np.random.default_rng(0)
X_MI = rng.standard_normal((48, 24)).astype(np.float32)
W_IO = rng.standard_normal((24, 8)).astype(np.float32)  # more inputs than outputs: an MLP's down projection
C_MO = rng.standard_normal((48, 8)).astype(np.float32)


def loss(product, x, w):
    return jnp.sum(product(x, w) * C_MO)


def primitives(fn, *args) -> list[str]:
    """Every primitive of `fn`'s jaxpr, those inside nested jaxprs (jit, custom rules) included."""
    return [str(eqn.primitive) for eqn in all_equations(jax.make_jaxpr(fn)(*args).jaxpr)]


def test_values_and_gradients_equal_numpys():
    x64, w64, c64 = (a.astype(np.float64) for a in (X_MI, W_IO, C_MO))
    np.testing.assert_allclose(dense_product(X_MI, W_IO), x64 @ w64, rtol=1e-5, atol=1e-5)
    dx, dw = jax.grad(lambda x, w: loss(dense_product, x, w), argnums=(0, 1))(X_MI, W_IO)
    np.testing.assert_allclose(dx, c64 @ w64.T, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(dw, x64.T @ c64, rtol=1e-5, atol=1e-5)


def test_the_weight_gradient_is_taken_from_x_transposed_written_out():
    grad = jax.grad(lambda x, w: loss(dense_product, x, w), argnums=(0, 1))
    assert "optimization_barrier" in primitives(grad, X_MI, W_IO)


@pytest.mark.parametrize("case", ["inputs <= outputs", "several devices"])
def test_elsewhere_the_product_is_jnps(case, monkeypatch):
    w = W_IO.T.copy() if case == "inputs <= outputs" else W_IO
    x = X_MI[:, :8] if case == "inputs <= outputs" else X_MI
    if case == "several devices":
        monkeypatch.setattr(module, "on_one_cpu_device", lambda: False)
    grad = jax.grad(lambda x, w: jnp.sum(dense_product(x, w)), argnums=(0, 1))
    assert "optimization_barrier" not in primitives(grad, x, w)
    assert "custom_jvp_call" not in primitives(grad, x, w)


def test_forward_mode_and_second_derivatives_equal_jnp_dots():
    plain = lambda x, w: jnp.dot(x, w)
    tangents = (rng.standard_normal(X_MI.shape).astype(np.float32), rng.standard_normal(W_IO.shape).astype(np.float32))
    for ours, theirs in zip(jax.jvp(dense_product, (X_MI, W_IO), tangents), jax.jvp(plain, (X_MI, W_IO), tangents)):
        np.testing.assert_allclose(ours, theirs, rtol=1e-5, atol=1e-5)
    x, w = X_MI[:6, :4], W_IO[:4, :2]
    cubic = lambda product: (lambda x, w: jnp.sum(product(x, w) ** 3))
    ours = jax.hessian(cubic(dense_product), argnums=1)(x, w)
    theirs = jax.hessian(cubic(plain), argnums=1)(x, w)
    np.testing.assert_allclose(ours, theirs, rtol=1e-4, atol=1e-4)


def test_a_frozen_weight_costs_no_weight_gradient_product():
    """Differentiated in x only (a LoRA base weight): the forward product and the input gradient, nothing else."""
    grad_x = jax.grad(lambda x: loss(dense_product, x, W_IO))
    ops = primitives(grad_x, X_MI)
    assert "optimization_barrier" not in ops
    assert ops.count("dot_general") == 2, ops


def test_bfloat16_compute_with_float32_outputs():
    x, w = X_MI.astype(jnp.bfloat16), W_IO.astype(jnp.bfloat16)
    y = dense_product(x, w, jnp.float32)
    assert y.dtype == jnp.float32
    dx, dw = jax.grad(lambda x, w: jnp.sum(dense_product(x, w, jnp.float32) * C_MO), argnums=(0, 1))(x, w)
    assert dx.dtype == dw.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(dw, np.float32), X_MI.T @ C_MO, rtol=0.05, atol=0.5)


def test_an_intercepted_product_is_called_as_written(monkeypatch):
    """qwix's LoRA and quantisation replace `jnp.dot` while a model runs and create their parameters inside it: the
    call must stay in the module's own trace (inside the custom rule flax refused to create them)."""
    calls = []
    plain = jnp.dot

    def intercepting_dot(*args, **kwargs):
        calls.append(args[0].shape)
        return plain(*args, **kwargs)

    monkeypatch.setattr(jnp, "dot", intercepting_dot)
    grad = jax.grad(lambda x, w: loss(dense_product, x, w), argnums=(0, 1))
    ops = primitives(grad, X_MI, W_IO)
    assert calls == [X_MI.shape], "the interceptor saw the product, once"
    assert "optimization_barrier" not in ops and "custom_jvp_call" not in ops
