"""Where bfloat16 models keep float32: the gradient accumulator, RMSNorm's statistics and the tied head's logits.
Each is invisible with float32 parameters and compute, where the other tests run."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from easytrain import LossOutput, TrainState
from easytrain.models import init_model
from easytrain.state import raw_key, split_model
from easytrain.steps import accumulate_gradients
from model_configs import tiny_config

SMALL = 2.0 ** -9  # below half a bfloat16 step at 1 (2^-8): 1 + SMALL rounds back to 1 in bfloat16


def bf16_state(**config) -> TrainState:
    model = init_model(tiny_config(num_hidden_layers=1, **config), dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)
    graphdef, params, rest = split_model(model)
    return TrainState.create(graphdef=graphdef, params=params, model_state=rest, tx=optax.sgd(1.0), rng=raw_key(0))


def linear_loss(model, batch, rng, train, frozen) -> LossOutput:
    """`scale` times the sum of every weight: each weight's gradient is the micro-batch's `scale`, exactly."""
    weights = jax.tree.leaves(nnx.state(model, nnx.Param))
    total = sum(jnp.sum(w.astype(jnp.float32)) for w in weights)
    return LossOutput(batch["scale"][0] * total, jnp.ones((), jnp.float32))


def test_accumulated_bfloat16_gradients_are_summed_in_float32_and_rounded_once():
    """Micro-batch gradients 1, 2^-9, 2^-9, 2^-9 of bfloat16 weights: summed in float32 and divided by the count
    4 they give bf16((1 + 3 * 2^-9) / 4); a bfloat16 accumulator drops each 2^-9 and gives 1/4."""
    batch = {"scale": np.array([1.0, SMALL, SMALL, SMALL], np.float32)}
    grads, _, _ = jax.jit(lambda s, b: accumulate_gradients(s, b, loss_fn=linear_loss, num_micro=4))(bf16_state(),
                                                                                                      batch)
    once = np.float32((np.float32(1) + 3 * np.float32(SMALL)) / 4).astype(jnp.bfloat16)
    assert once != np.float32(0.25).astype(jnp.bfloat16)  # the example tells the two apart
    for leaf in jax.tree.leaves(grads):
        assert leaf.dtype == jnp.bfloat16
        np.testing.assert_array_equal(np.asarray(leaf, np.float32), np.float32(once))


def test_rmsnorm_statistics_are_float32_for_bfloat16_inputs():
    """The bf16 output equals the float32 computation rounded once (bf16 squares and variance agree on ~78%)."""
    rng = np.random.default_rng(0)
    x_MD = jnp.asarray(rng.normal(size=(16, 64)) * rng.uniform(0.5, 3, size=(16, 1)), jnp.bfloat16)
    norm = init_model(tiny_config(num_hidden_layers=1, rms_norm_eps=1e-6), dtype=jnp.bfloat16).norm
    out = np.asarray(norm(x_MD), np.float32)
    x32 = np.asarray(x_MD, np.float32)
    reference = x32 / np.sqrt(np.mean(np.square(x32), -1, keepdims=True) + np.float32(1e-6))
    assert np.mean(out == reference.astype(jnp.bfloat16).astype(np.float32)) > 0.99


def test_tied_head_logits_are_float32_under_bfloat16_compute():
    model = init_model(tiny_config(num_hidden_layers=1, tie_word_embeddings=True), dtype=jnp.bfloat16)
    assert model.lm_head is None  # the tied path: Embed.attend
    hidden_MD = jnp.asarray(np.random.default_rng(0).normal(size=(3, 64)), jnp.bfloat16)
    assert model.logits_from_hidden(hidden_MD).dtype == jnp.float32
