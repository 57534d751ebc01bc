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

from easytrain.losses import Batch, LossFn, LossOutput
from easytrain.state import TrainState

Metrics = dict[str, jax.Array]
#: Metric names the steps produce themselves; a loss's own metric may not take one of them.
BUILT_IN_METRICS = ("loss_sum", "num_tokens", "grad_norm", "learning_rate", "skipped")


def loss_metrics(out: LossOutput) -> Metrics:
    """The loss's sums under their metric names, refusing a user metric that would shadow a built-in one."""
    if clashes := sorted(set(out.metric_sums) & set(BUILT_IN_METRICS)):
        raise ValueError(f"the loss returns metric(s) {', '.join(map(repr, clashes))}, which would overwrite the "
                         f"built-in one(s) of that name ({', '.join(BUILT_IN_METRICS)}); rename them.")
    return {"loss_sum": out.loss_sum, "num_tokens": out.num_tokens, **out.metric_sums}


def split_microbatches(batch: Batch, num_micro: int) -> Batch:
    """`[G, ...] -> [num_micro, G // num_micro, ...]`, micro-batch i taking rows i, i + A, i + 2A, ...

    Interleaving keeps every micro-batch spread evenly over the data-parallel devices.
    """

    def split(x: jax.Array) -> jax.Array:
        x = x.reshape((x.shape[0] // num_micro, num_micro) + x.shape[1:])
        return jnp.swapaxes(x, 0, 1)

    return jax.tree.map(split, dict(batch))


def _micro_grads(state: TrainState, loss_fn: LossFn, micro: Batch, rng: jax.Array,
                 model_state: Any) -> tuple[Any, Metrics, Any]:
    """Gradients of the summed (not averaged) loss of one micro-batch, its metric sums, and the module's
    non-trainable state after the forward pass (running statistics, advanced RNG streams)."""

    def summed_loss(params):
        module = state.replace(params=params, model_state=model_state).model(train=True)
        out = loss_fn(module, micro, rng, True)
        return out.loss_sum, (out, state.model_state_of(module))

    (_, (out, new_model_state)), grads = jax.value_and_grad(summed_loss, has_aux=True)(state.params)
    return grads, loss_metrics(out), new_model_state


def accumulate_gradients(state: TrainState, batch: Batch, *, loss_fn: LossFn,
                         num_micro: int) -> tuple[Any, Metrics, Any]:
    """Summed gradients, metric sums and the new non-trainable module state over `num_micro`
    micro-batches (`lax.scan`, no Python loop); module state flows from one micro-batch to the next."""
    rng = state.step_rng()
    if num_micro == 1:
        return _micro_grads(state, loss_fn, batch, rng, state.model_state)
    micro_batches = split_microbatches(batch, num_micro)
    zero_grads = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), state.params)
    first = jax.tree.map(lambda x: x[0], micro_batches)
    sums_shape = jax.eval_shape(lambda: _micro_grads(state, loss_fn, first, rng, state.model_state)[1])
    zero_sums = jax.tree.map(jnp.zeros_like, sums_shape)

    def body(carry, xs):
        grads_acc, sums_acc, model_state = carry
        index, micro = xs
        grads, sums, model_state = _micro_grads(state, loss_fn, micro, jax.random.fold_in(rng, index), model_state)
        grads_acc = jax.tree.map(lambda a, g: a + g.astype(jnp.float32), grads_acc, grads)
        return (grads_acc, jax.tree.map(jnp.add, sums_acc, sums), model_state), None

    carry = (zero_grads, zero_sums, state.model_state)
    (grads, sums, model_state), _ = jax.lax.scan(body, carry, (jnp.arange(num_micro), micro_batches))
    grads = jax.tree.map(lambda g, p: g.astype(p.dtype), grads, state.params)
    return grads, sums, model_state


def _is_counter(leaf: jax.Array) -> bool:
    """Integer and PRNG-key leaves: step counts (optax's `count`) and RNG streams, never values to revert."""
    return jnp.issubdtype(leaf.dtype, jnp.integer) or jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key)


def keep_if_not_finite(new: Any, old: Any, finite: jax.Array) -> Any:
    """`new` where the step was finite; otherwise `old` values with `new` counters.

    A skipped step consumed its batch: every step counter (optax's `count`, RNG stream counts) advances
    with `TrainState.step`, so the schedule the optimizer applies stays `schedule(step)`, the rate that
    is logged. Parameters, optimizer moments and running statistics keep their old values.
    """
    return jax.tree.map(lambda n, o: n if _is_counter(o) else jnp.where(finite, n, o), new, old)


def train_step(state: TrainState, batch: Batch, *, loss_fn: LossFn, schedule: optax.Schedule,
               num_micro: int = 1, skip_non_finite: bool = True) -> tuple[TrainState, Metrics]:
    """One optimizer update on one global batch.

    Returns per-step metrics as device scalars: `loss_sum` and `num_tokens` (so any window of steps
    can be token-averaged later), `grad_norm`, `learning_rate` (the rate this update applied),
    `skipped` (1 when a non-finite loss or gradient made the step leave parameters unchanged), and the
    loss's extra metric sums.
    """
    grad_sums, sums, model_state = accumulate_gradients(state, batch, loss_fn=loss_fn, num_micro=num_micro)
    count = jnp.maximum(sums["num_tokens"], 1.0)
    grads = jax.tree.map(lambda g: g / count.astype(g.dtype), grad_sums)
    grad_norm = optax.tree.norm(grads)
    new_state = state.apply_gradients(grads).replace(model_state=model_state)
    finite = jnp.isfinite(sums["loss_sum"]) & jnp.isfinite(grad_norm)
    if skip_non_finite:
        updated = (new_state.params, new_state.opt_state, new_state.model_state)
        params, opt_state, model_state = keep_if_not_finite(updated, (state.params, state.opt_state,
                                                                      state.model_state), finite)
        new_state = new_state.replace(params=params, opt_state=opt_state, model_state=model_state)
    metrics = {**sums, "grad_norm": grad_norm, "learning_rate": schedule(state.step),
               "skipped": (~finite).astype(jnp.int32)}
    return new_state, metrics


def eval_step(state: TrainState, batch: Batch, *, loss_fn: LossFn) -> Metrics:
    """Metric sums of one eval batch, the module in eval mode; padded rows carry `loss_mask == 0` and add nothing."""
    return loss_metrics(loss_fn(state.model(train=False), batch, state.step_rng(), False))


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
