"""The MLP's gated activation, rematerialised: what it keeps for the backward pass, its derivatives both ways."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from easytrain.models import init_model
from easytrain.models.gated import gated_activation, swiglu

from model_configs import tiny_config


def autodiff_swiglu(gate, up):
    return jax.nn.silu(gate) * up


def gate_up_and_cotangent(dtype, shape=(64, 48)):
    """Gates from -40 to 40 (the sigmoid saturating at both ends) and random ups and output gradients."""
    rng = np.random.default_rng(0)
    gate = np.concatenate([np.linspace(-40, 40, shape[1])[None], rng.normal(0, 3, (shape[0] - 1, shape[1]))])
    return (jnp.asarray(gate, dtype), jnp.asarray(rng.normal(size=shape), dtype),
            jnp.asarray(rng.normal(size=shape), dtype))


@pytest.mark.parametrize("dtype, tolerance", [(jnp.float32, 1e-6), (jnp.bfloat16, 2e-2)])
def test_swiglu_values_and_gradients_match_autodiff(dtype, tolerance):
    gate, up, cotangent = gate_up_and_cotangent(dtype)
    ours, our_vjp = jax.vjp(swiglu, gate, up)
    reference, reference_vjp = jax.vjp(autodiff_swiglu, gate, up)
    assert ours.dtype == dtype
    np.testing.assert_allclose(np.float32(ours), np.float32(reference), rtol=tolerance, atol=tolerance)
    for mine, theirs in zip(our_vjp(cotangent), reference_vjp(cotangent)):
        assert mine.dtype == dtype
        np.testing.assert_allclose(np.float32(mine), np.float32(theirs), rtol=tolerance, atol=tolerance)


def test_every_gated_activation_keeps_only_its_inputs_for_the_backward_pass():
    """Differentiated as written, `silu(g) * u` keeps five `[M, F]` arrays (the sigmoid and silu among them)."""
    gate, up, _ = gate_up_and_cotangent(jnp.float32)
    assert len(jax.tree.leaves(jax.vjp(autodiff_swiglu, gate, up)[1])) == 5
    for name in ("silu", "gelu", "gelu_pytorch_tanh"):
        residuals = jax.tree.leaves(jax.vjp(gated_activation(name), gate, up)[1])
        assert len(residuals) == 2 and all(r is gate or r is up for r in residuals), name


def test_swiglu_has_forward_mode_derivatives():
    """`jax.jvp` and `jax.hessian` work through it (a `jax.custom_vjp` would refuse both) and equal autodiff's."""
    gate, up, tangent = gate_up_and_cotangent(jnp.float32, shape=(4, 6))
    ours = jax.jvp(swiglu, (gate, up), (tangent, tangent))
    theirs = jax.jvp(autodiff_swiglu, (gate, up), (tangent, tangent))
    for mine, reference in zip(ours, theirs):
        np.testing.assert_allclose(mine, reference, rtol=1e-6, atol=1e-6)
    hessian = jax.hessian(lambda g: jnp.sum(swiglu(g, up)))(gate[0])
    np.testing.assert_allclose(hessian, jax.hessian(lambda g: jnp.sum(autodiff_swiglu(g, up)))(gate[0]), rtol=1e-5,
                               atol=1e-6)


def test_every_activation_is_gated_as_its_plain_form():
    gate, up, _ = gate_up_and_cotangent(jnp.float32)
    for name, plain in {"silu": jax.nn.silu, "gelu": lambda x: jax.nn.gelu(x, approximate=False),
                        "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True)}.items():
        np.testing.assert_allclose(gated_activation(name)(gate, up), plain(gate) * up, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("remat", ["none", "dots", "full"])
def test_model_gradients_match_the_autodiff_mlp_under_every_remat_policy(remat, monkeypatch):
    """The whole model's parameter gradients with SwiGLU's own backward equal those with JAX's derivative."""
    model = init_model(tiny_config(num_hidden_layers=2), seed=0)
    model.remat = remat
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    ids_BT = jnp.asarray(np.random.default_rng(1).integers(0, 128, (2, 16)))

    def grads():
        def loss(params):
            return jnp.mean(jax.nn.log_softmax(nnx.merge(graphdef, params, rest)(ids_BT)) ** 2)
        return jax.jit(jax.grad(loss))(params)

    ours = grads()
    monkeypatch.setattr("easytrain.models.layers.gated_activation", lambda name: autodiff_swiglu)
    reference = grads()
    for mine, theirs in zip(jax.tree.leaves(ours), jax.tree.leaves(reference)):
        np.testing.assert_allclose(mine, theirs, rtol=1e-5, atol=1e-7)


def test_the_model_mlp_keeps_only_the_projections_outputs_of_its_hidden_width():
    """Per layer, three `[M, F]` arrays wait for the backward pass (the gate and up projections' outputs and the down
    projection's input, which on one CPU device waits transposed, `easytrain.models.dense_product`), not six."""
    model = init_model(tiny_config(num_hidden_layers=1, intermediate_size=96), seed=0)
    graphdef, state = nnx.split(model.layers[0].mlp)
    x_MD = jnp.ones((10, 64))
    _, vjp = jax.vjp(lambda state, x_MD: nnx.merge(graphdef, state)(x_MD), state, x_MD)
    assert sum(leaf.shape in ((10, 96), (96, 10)) for leaf in jax.tree.leaves(vjp)) == 3
