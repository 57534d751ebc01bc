"""Pure, module-level train and eval steps: `(state, batch) -> (state, metrics)`.

Configuration (the loss, accumulation, the non-finite policy) is bound with `functools.partial`
before `jax.jit`, never through static positional arguments. Gradient accumulation is a `lax.scan`
over micro-batches inside the compiled step, and the loss and gradients are normalised once by the
supervised-token count of the whole global batch.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax

from easytrain.losses import Batch, LossFn
from easytrain.state import TrainState

Metrics = dict[str, jax.Array]


def split_microbatches(batch: Batch, num_micro: int) -> Batch:
    """`[G, ...] -> [num_micro, G // num_micro, ...]`, micro-batch i taking rows i, i + A, i + 2A, ...

    Interleaving keeps every micro-batch spread evenly over the data-parallel devices.
    """

    def split(x: jax.Array) -> jax.Array:
        x = x.reshape((x.shape[0] // num_micro, num_micro) + x.shape[1:])
        return jnp.swapaxes(x, 0, 1)

    return jax.tree.map(split, dict(batch))


def _micro_grads(state: TrainState, loss_fn: LossFn, micro: Batch, rng: jax.Array) -> tuple[Any, Metrics]:
    """Gradients of the summed (not averaged) loss of one micro-batch, plus its metric sums."""

    def summed_loss(params):
        model = state.replace(params=params).model()
        out = loss_fn(model, micro, rng, True)
        return out.loss_sum, out

    (_, out), grads = jax.value_and_grad(summed_loss, has_aux=True)(state.params)
    sums = {"loss_sum": out.loss_sum, "num_tokens": out.num_tokens, **out.metric_sums}
    return grads, sums


def accumulate_gradients(state: TrainState, batch: Batch, *, loss_fn: LossFn,
                         num_micro: int) -> tuple[Any, Metrics]:
    """Summed gradients and metric sums over `num_micro` micro-batches (`lax.scan`, no Python loop)."""
    rng = state.step_rng()
    if num_micro == 1:
        return _micro_grads(state, loss_fn, batch, rng)
    micro_batches = split_microbatches(batch, num_micro)
    zero_grads = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), state.params)
    first = jax.tree.map(lambda x: x[0], micro_batches)
    zero_sums = jax.tree.map(jnp.zeros_like, jax.eval_shape(lambda: _micro_grads(state, loss_fn, first, rng)[1]))

    def body(carry, xs):
        grads_acc, sums_acc = carry
        index, micro = xs
        grads, sums = _micro_grads(state, loss_fn, micro, jax.random.fold_in(rng, index))
        grads_acc = jax.tree.map(lambda a, g: a + g.astype(jnp.float32), grads_acc, grads)
        return (grads_acc, jax.tree.map(jnp.add, sums_acc, sums)), None

    (grads, sums), _ = jax.lax.scan(body, (zero_grads, zero_sums), (jnp.arange(num_micro), micro_batches))
    grads = jax.tree.map(lambda g, p: g.astype(p.dtype), grads, state.params)
    return grads, sums


def train_step(state: TrainState, batch: Batch, *, loss_fn: LossFn, schedule: optax.Schedule,
               num_micro: int = 1, skip_non_finite: bool = True) -> tuple[TrainState, Metrics]:
    """One optimizer update on one global batch.

    Returns per-step metrics as device scalars: `loss_sum` and `num_tokens` (so any window of steps
    can be token-averaged later), `grad_norm`, `learning_rate`, `skipped` (1 when a non-finite loss
    or gradient made the step leave parameters unchanged), and the loss's extra metric sums.
    """
    grad_sums, sums = accumulate_gradients(state, batch, loss_fn=loss_fn, num_micro=num_micro)
    count = jnp.maximum(sums["num_tokens"], 1.0)
    grads = jax.tree.map(lambda g: g / count.astype(g.dtype), grad_sums)
    grad_norm = optax.tree.norm(grads)
    new_state = state.apply_gradients(grads)
    finite = jnp.isfinite(sums["loss_sum"]) & jnp.isfinite(grad_norm)
    if skip_non_finite:
        kept = jax.tree.map(lambda new, old: jnp.where(finite, new, old),
                            (new_state.params, new_state.opt_state), (state.params, state.opt_state))
        new_state = new_state.replace(params=kept[0], opt_state=kept[1])
    metrics = {**sums, "grad_norm": grad_norm, "learning_rate": schedule(state.step),
               "skipped": (~finite).astype(jnp.int32)}
    return new_state, metrics


def eval_step(state: TrainState, batch: Batch, *, loss_fn: LossFn) -> Metrics:
    """Metric sums of one eval batch; padded rows carry `loss_mask == 0` and add nothing."""
    out = loss_fn(state.model(), batch, state.step_rng(), False)
    return {"loss_sum": out.loss_sum, "num_tokens": out.num_tokens, **out.metric_sums}


def summarize(step_metrics: list[dict[str, Any]], prefix: str = "") -> dict[str, float]:
    """Token-weighted averages of fetched per-step (or per-batch) metric sums."""
    totals: dict[str, float] = {}
    for metrics in step_metrics:
        for key, value in metrics.items():
            totals[key] = totals.get(key, 0.0) + float(value)
    tokens = totals.pop("num_tokens", 0.0)
    denominator = max(tokens, 1.0)
    out = {"loss": totals.pop("loss_sum", 0.0) / denominator, "num_tokens": tokens}
    n = max(len(step_metrics), 1)
    for key in ("grad_norm", "learning_rate"):
        if key in totals:
            out[key] = totals.pop(key) / n
    if "skipped" in totals:
        out["skipped_steps"] = totals.pop("skipped")
    out.update({key: value / denominator for key, value in totals.items()})
    return {f"{prefix}{key}": value for key, value in out.items()}
