import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from easytrain import TrainingArguments
from easytrain.optim import build_optimizer, build_schedule, decay_mask


@pytest.mark.parametrize("kind", ["constant", "linear", "cosine"])
def test_warmup_peaks_exactly_at_warmup_steps_and_decays(kind):
    args = TrainingArguments(learning_rate=1e-2, warmup_steps=10, lr_scheduler_type=kind)
    schedule = build_schedule(args, total_steps=50)
    assert float(schedule(0)) == 0.0
    assert float(schedule(10)) == pytest.approx(1e-2)
    assert float(schedule(5)) == pytest.approx(5e-3)
    if kind == "constant":
        assert float(schedule(50)) == pytest.approx(1e-2)
    else:
        assert float(schedule(50)) == pytest.approx(0.0, abs=1e-9)
        assert float(schedule(30)) < 1e-2


def test_warmup_ratio():
    schedule = build_schedule(TrainingArguments(learning_rate=1.0, warmup_ratio=0.2), total_steps=100)
    assert float(schedule(20)) == pytest.approx(1.0)
    assert float(schedule(10)) == pytest.approx(0.5)


@pytest.mark.parametrize("name", ["adamw", "adafactor", "lion", "sgd"])
def test_every_optimizer_minimises_a_quadratic(name):
    args = TrainingArguments(optimizer=name, learning_rate=0.05, weight_decay=0.01, lr_scheduler_type="constant")
    tx = build_optimizer(args, build_schedule(args, 100))
    params = {"w": jnp.full((4, 4), 3.0), "b": jnp.full((4,), -2.0)}
    state = tx.init(params)
    loss = lambda p: sum(jnp.sum(x**2) for x in jax.tree.leaves(p))
    start = float(loss(params))
    for _ in range(60):
        updates, state = tx.update(jax.grad(loss)(params), state, params)
        params = optax.apply_updates(params, updates)
    assert float(loss(params)) < 0.5 * start


def test_decay_skips_vectors():
    mask = decay_mask({"kernel": np.zeros((2, 3)), "scale": np.zeros(3)})
    assert mask == {"kernel": True, "scale": False}


def test_clipping_bounds_the_update():
    args = TrainingArguments(optimizer="sgd", sgd_momentum=0.0, learning_rate=1.0, max_grad_norm=1.0,
                             lr_scheduler_type="constant")
    tx = build_optimizer(args, build_schedule(args, 10))
    params = {"w": jnp.zeros(4)}
    updates, _ = tx.update({"w": jnp.full(4, 100.0)}, tx.init(params), params)
    assert float(optax.tree.norm(updates)) == pytest.approx(1.0, rel=1e-5)
