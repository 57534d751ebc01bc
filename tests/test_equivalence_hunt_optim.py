"""AdamW and SGD (L2), with weight decay and clipping, update each layer's weights the same whether the layers are
stored one by one or stacked (`scan_layers`): decay skips the stacked norm scales and biases as it skips the layer's
own vectors, and the clipping norm is the same (Adafactor's stacked decay: tests/test_optim.py)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from easytrain import TrainingArguments
from easytrain.models import init_model
from easytrain.optim import build_optimizer, build_schedule
from model_configs import family_config
from scan_models import per_layer


@pytest.fixture(scope="module")
def layouts() -> dict[bool, dict]:
    """`scan_layers` -> the same weights in that layout, as a pure dict."""
    model = init_model(family_config("qwen3"))  # q/k norms and biases: 1-D per layer, 2-D stacked
    unrolled = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    model.scan_layers = True
    return {False: unrolled, True: nnx.to_pure_dict(nnx.state(model, nnx.Param))}


def two_updates(name: str, params: dict) -> dict:
    """The second update of `name` (weight decay 0.1, clipping at 1) from gradients that depend only on each
    weight's value, so both layouts get the same per-layer gradients; per-layer paths."""
    args = TrainingArguments(optimizer=name, learning_rate=1e-2, weight_decay=0.1, max_grad_norm=1.0,
                             lr_scheduler_type="constant", warmup_steps=0)
    tx = build_optimizer(args, build_schedule(args, 10))

    @jax.jit
    def run(params):
        grads = jax.tree.map(lambda p: jnp.cos(p * 7.0) * 0.01, params)
        updates, state = tx.update(grads, tx.init(params), params)
        return tx.update(grads, state, jax.tree.map(jnp.add, params, updates))[0]

    return per_layer(run(params))


@pytest.mark.parametrize("name", ["adamw", "sgd"])  # lion: optax's mask as adamw; adafactor: tests/test_optim.py
def test_updates_are_the_same_with_stacked_layers(layouts, name):
    unrolled, stacked = two_updates(name, layouts[False]), two_updates(name, layouts[True])
    assert list(stacked) == list(unrolled)
    for path, want in unrolled.items():
        scale = float(np.abs(want).max())
        assert scale > 0, path
        # measured equal; a norm scale decayed as a matrix is 0.1 of the largest entry off
        assert float(np.abs(stacked[path] - want).max()) <= 1e-5 * scale, path
