"""`train_step` skips a step whose gradient is not finite even when its loss is: a loss with a kink (a square root at
0, a norm of a zero vector) is finite while its gradient is infinite, and applying that update turns every parameter
it reaches into inf or NaN, for good. A guard that looked at the loss alone would let it through."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from easytrain import LossOutput, TrainState
from easytrain.state import raw_key, split_model
from easytrain.steps import train_step


class Line(nnx.Module):
    """Two weights: a model whose step compiles in a fraction of a second."""

    def __init__(self):
        self.w = nnx.Param(jnp.asarray([1.0, 2.0]))


def loss_with_a_kink(model, batch, rng, train, frozen) -> LossOutput:
    """A squared error plus sqrt(w0 - w0): 0 added to the loss, +inf added to w0's gradient."""
    w = model.w[...]
    kink = jnp.sqrt(w[0] - jax.lax.stop_gradient(w[0]))
    return LossOutput(jnp.sum((w * batch["x"] - batch["y"]) ** 2) + kink, jnp.asarray(2.0), {})


def test_a_finite_loss_with_an_infinite_gradient_is_skipped():
    graphdef, params, rest = split_model(Line())
    state = TrainState.create(graphdef=graphdef, params=params, model_state=rest, tx=optax.adamw(1e-2),
                              rng=raw_key(0))
    batch = {"x": np.ones((2, 2), np.float32), "y": np.zeros((2, 2), np.float32)}
    step = jax.jit(functools.partial(train_step, loss_fn=loss_with_a_kink, schedule=lambda s: 1e-2))
    new_state, metrics = step(state, batch)
    assert np.isfinite(float(metrics["loss"].total)), "the case needs a finite loss"
    assert not np.isfinite(float(metrics["grad_norm"].total)), "... and a gradient that is not"
    assert int(metrics["skipped_steps"].total) == 1
    assert int(new_state.step) == 1  # the batch was consumed
    np.testing.assert_array_equal(new_state.params["w"], [1.0, 2.0])  # but no weight was updated
