"""Pure, module-level train and eval steps: `(state, batch) -> (state, metrics)`.

Configuration (the loss, accumulation, the non-finite policy) is bound with `functools.partial`
before `jax.jit`, never through static positional arguments. Gradient accumulation is a `lax.scan`
over micro-batches inside the compiled step, and the loss and gradients are normalised once by the
loss's count over the whole global batch (without accumulation, by differentiating the loss divided by
that count: no division of every gradient afterwards). Metrics are `easytrain.metrics` values, merged,
not averaged.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
import optax

from easytrain.losses import Batch, LossFn, LossOutput
from easytrain.metrics import Last, Mean, Metric, Sum, divisor, identities, is_metric, merge_all, numeric
from easytrain.norms import global_norm
from easytrain.state import TrainState

Metrics = dict[str, Metric]
#: Metric names the steps produce themselves.
BUILT_IN_METRICS = ("loss", "grad_norm", "learning_rate", "skipped_steps")
#: Fields a train log record holds beside the metrics: the record's own keys, the window's throughput, the epoch,
#: and in the first record the compile time, memory plan and peak FLOP/s.
LOG_RECORD_FIELDS = ("step", "split", "time", "epoch", "step_time", "tokens_per_second", "samples_per_second",
                     "padding_efficiency", "mfu", "compile_seconds", "peak_flops", "planned_memory_mib",
                     "planned_temp_mib")
#: Names a loss's own metric may not take: it would overwrite, or be overwritten by, the field of that name.
RESERVED_METRIC_NAMES = BUILT_IN_METRICS + LOG_RECORD_FIELDS


def checked(out: Any) -> LossOutput:
    """`out` if it is a `LossOutput` of a scalar sum with scalar metrics; else an error naming what is wrong, raised
    while the step is traced (before the first step runs) instead of an attribute or shape error deep inside it."""
    if not isinstance(out, LossOutput):
        what = f"an array of shape {out.shape}" if hasattr(out, "shape") else f"a {type(out).__name__}"
        raise TypeError(f"compute_loss returned {what}; return easytrain.LossOutput(loss_sum, count, "
                        "metrics): the loss summed over what it averages and how many of those (the step divides "
                        "once over the whole batch).")
    if (shape := jnp.shape(out.loss_sum)) != ():
        raise ValueError(f"compute_loss's loss_sum has shape {shape}; it must be a scalar: sum the per-token or "
                         "per-example losses (and give their number as count).")
    if not isinstance(out.metrics, Mapping):
        raise TypeError(f"compute_loss's metrics is a {type(out.metrics).__name__}; it must be a dict of name -> "
                        "metric, e.g. LossOutput(loss_sum, count, {'accuracy': Mean(correct, count)}).")
    for name, value in out.metrics.items():
        for leaf in (value if is_metric(value) else (value,)):
            if (shape := jnp.shape(leaf)) != ():
                raise ValueError(f"compute_loss's metric {name!r} has shape {shape}; a metric is a scalar: reduce it "
                                 "(a sum with its count as Mean(total, count), jnp.max in Max, ...).")
    return out


class LossKeyError(KeyError):
    """A key the loss read that its batch or frozen entries lack; a `KeyError` that prints its message as written."""

    def __str__(self) -> str:
        return str(self.args[0])


def called(loss_fn: LossFn, module: Any, batch: Batch, rng: jax.Array, train: bool, frozen: Mapping[str, Any]) -> Any:
    """`loss_fn`'s output; a `KeyError` it raises while traced (before any step runs) for a name in neither the batch
    nor the frozen entries names their fields and where each comes from, instead of a bare key. Python at trace time
    only: nothing at run time."""
    try:
        return loss_fn(module, batch, rng, train, frozen)
    except KeyError as error:
        key = error.args[0] if len(error.args) == 1 else None
        # A key the loss was given comes from a lookup of its own (a config dict): its KeyError is the one to show.
        if isinstance(error, LossKeyError) or not isinstance(key, str) or key in batch or key in frozen:
            raise
        listed = lambda names: ", ".join(map(repr, sorted(names))) or "none"  # noqa: E731
        raise LossKeyError(f"compute_loss read {key!r}, which it was not given: the batch's fields: {listed(batch)} "
                           f"(what the trainer's collate returns, less host_only_fields); the frozen entries: "
                           f"{listed(frozen)} (what configure_frozen returns). Read one of those names, or have "
                           "collate or configure_frozen provide it.") from error


def loss_metrics(out: LossOutput) -> Metrics:
    """The loss and its metrics as reducible values; a bare array is a sum over the loss's own count."""
    if clashes := sorted(set(out.metrics) & set(RESERVED_METRIC_NAMES)):
        raise ValueError(f"the loss returns metric(s) {', '.join(map(repr, clashes))}, a name taken by a built-in "
                         f"metric or a field of every train log record ({', '.join(RESERVED_METRIC_NAMES)}); "
                         "rename them.")
    count = jnp.asarray(out.count, jnp.float32)
    extra = {name: numeric(value if is_metric(value) else Mean(value, count)) for name, value in out.metrics.items()}
    return {"loss": Mean(out.loss_sum, count), **extra}


def split_microbatches(batch: Batch, num_micro: int) -> Batch:
    """`[G, ...] -> [num_micro, G // num_micro, ...]`, micro-batch i taking rows i, i + A, i + 2A, ...

    Interleaving keeps every micro-batch spread evenly over the data-parallel devices; a row (an
    example, a preference pair) is never split.
    """

    def split(x: jax.Array) -> jax.Array:
        x = x.reshape((x.shape[0] // num_micro, num_micro) + x.shape[1:])
        return jnp.swapaxes(x, 0, 1)

    return jax.tree.map(split, dict(batch))


def _micro_grads(state: TrainState, loss_fn: LossFn, micro: Batch, rng: jax.Array,
                 model_state: Any, *, mean: bool = False) -> tuple[Any, Metrics, Any]:
    """Gradients of one micro-batch's summed loss (or, with `mean`, of the loss divided by its count), its
    metrics, and the module's non-trainable state after the forward pass (running statistics, RNG streams).

    `mean` divides the differentiated scalar by the (constant) count, so the backward pass starts from
    `1 / count`: the gradients come out averaged, without a division of every gradient afterwards.
    """
    frozen = state.frozen_views()

    def objective(params):
        module = state.replace(params=params, model_state=model_state).model(train=True)
        out = checked(called(loss_fn, module, micro, rng, True, frozen))
        scale = 1 / divisor(jax.lax.stop_gradient(jnp.asarray(out.count, jnp.float32))) if mean else 1
        return out.loss_sum * scale, (out, state.model_state_of(module))

    (_, (out, new_model_state)), grads = jax.value_and_grad(objective, has_aux=True)(state.params)
    return grads, loss_metrics(out), new_model_state


def accumulate_gradients(state: TrainState, batch: Batch, *, loss_fn: LossFn,
                         num_micro: int) -> tuple[Any, Metrics, Any]:
    """Gradients of the loss averaged over its count on the whole global batch, merged metrics and the new
    non-trainable module state, over `num_micro` micro-batches (`lax.scan`, no Python loop; their summed
    gradients are divided by the total count once); module state flows from one micro-batch to the next."""
    rng = state.step_rng()
    if num_micro == 1:  # `fold_in(step_rng, 0)`, as with accumulation: a draw of `step_rng()` never repeats it
        return _micro_grads(state, loss_fn, batch, jax.random.fold_in(rng, 0), state.model_state, mean=True)
    micro_batches = split_microbatches(batch, num_micro)
    first = jax.tree.map(lambda x: x[0], micro_batches)
    shapes = jax.eval_shape(lambda: _micro_grads(state, loss_fn, first, rng, state.model_state)[1])
    zero_grads = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), state.params)

    def body(carry, xs):
        grads_acc, metrics_acc, model_state = carry
        index, micro = xs
        grads, metrics, model_state = _micro_grads(state, loss_fn, micro, jax.random.fold_in(rng, index), model_state)
        grads_acc = jax.tree.map(lambda a, g: a + g.astype(jnp.float32), grads_acc, grads)
        return (grads_acc, merge_all(metrics_acc, metrics), model_state), None

    carry = (zero_grads, identities(shapes), state.model_state)
    (grads, metrics, model_state), _ = jax.lax.scan(body, carry, (jnp.arange(num_micro), micro_batches))
    count = divisor(metrics["loss"].count)
    grads = jax.tree.map(lambda g, p: (g / count).astype(p.dtype), grads, state.params)
    return grads, metrics, model_state


def _is_counter(leaf: jax.Array) -> bool:
    """Integer and PRNG-key leaves: step counts (optax's `count`) and RNG streams, never values to revert."""
    return jnp.issubdtype(leaf.dtype, jnp.integer) or jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key)


def with_new_counters(new: Any, old: Any) -> Any:
    """`old` values with `new` counters: the state after a skipped step.

    A skipped step consumed its batch: every step counter (optax's `count`, RNG stream counts) advances
    with `TrainState.step`, so the schedule the optimizer applies stays `schedule(step)`, the rate that
    is logged. Parameters, optimizer moments and running statistics keep their old values. The choice is
    made per leaf while tracing, not by a select, so the discarded values are dead code that lowering drops.
    """
    return jax.tree.map(lambda n, o: n if _is_counter(o) else o, new, old)


def updated(state: TrainState, grads: Any, grad_norm: jax.Array, model_state: Any,
            keep: bool) -> tuple[Any, Any, Any]:
    """Parameters, optimizer state and module state after the update (`keep`), or after a skipped one: old
    values with new counters (`with_new_counters`), the optimizer's from an update with zero gradients of
    which only the counters are kept, so only they are computed. `grad_norm` goes to the optimizer as an
    extra argument (`easytrain.optim.clip_by_global_norm` clips with it instead of computing it again)."""
    if keep:
        new = state.apply_gradients(grads, grad_norm=grad_norm)
        return new.params, new.opt_state, model_state
    counted = state.apply_gradients(jax.tree.map(jnp.zeros_like, grads), grad_norm=jnp.zeros_like(grad_norm))
    return with_new_counters((counted.params, counted.opt_state, model_state),
                             (state.params, state.opt_state, state.model_state))


def train_step(state: TrainState, batch: Batch, *, loss_fn: LossFn, schedule: optax.Schedule,
               num_micro: int = 1, skip_non_finite: bool = True) -> tuple[TrainState, Metrics]:
    """One optimizer update on one global batch.

    Returns the loss's metrics plus `grad_norm`, `learning_rate` (the rate this update applied) and
    `skipped_steps` (1 when a non-finite loss or gradient made the step leave parameters unchanged),
    each a reducible `easytrain.metrics` value.
    """
    grads, metrics, model_state = accumulate_gradients(state, batch, loss_fn=loss_fn, num_micro=num_micro)
    loss = metrics["loss"]
    grad_norm = global_norm(grads)
    finite = jnp.isfinite(loss.total) & jnp.isfinite(grad_norm)
    # A branch, not a select over every parameter: the update runs only when it is kept, and the frozen parts
    # of the state (a LoRA base, reference models) stay outside it.
    if skip_non_finite:
        params, opt_state, model_state = jax.lax.cond(finite, functools.partial(updated, keep=True),
                                                      functools.partial(updated, keep=False), state, grads,
                                                      grad_norm, model_state)
    else:
        params, opt_state, model_state = updated(state, grads, grad_norm, model_state, keep=True)
    new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state, model_state=model_state)
    metrics = {**metrics, "grad_norm": Mean(grad_norm, jnp.ones((), jnp.float32)),
               "learning_rate": Last(jnp.asarray(schedule(state.step), jnp.float32)),
               "skipped_steps": Sum((~finite & skip_non_finite).astype(jnp.int32))}  # applied under 'ignore'
    return new_state, metrics


class DefaultMetrics(dict):
    """Metrics `compute_metrics` returns by default, not asked for by name: one the loss already reports (a
    classifier's own `accuracy`) is left to the loss instead of clashing with it."""


def checked_eval_metrics(metrics: Mapping[str, Any]) -> Metrics:
    """`compute_metrics`' values as `easytrain.metrics` values of scalars; else an error naming the metric, raised
    while the eval step is traced (at set-up) instead of at the first evaluation, after training steps."""
    if not isinstance(metrics, Mapping):
        raise TypeError(f"compute_metrics returned a {type(metrics).__name__}; return a dict of name -> metric "
                        "(Mean(total, count), Sum, Max, ...), {} for none.")
    checked_metrics: Metrics = {}
    for name, value in metrics.items():
        if not is_metric(value):
            what = f"array of shape {jnp.shape(value)}" if hasattr(value, "shape") else type(value).__name__
            raise TypeError(f"compute_metrics' metric {name!r} is a bare {what}; wrap it in a metric that says how "
                            "it merges: Mean(total, count) for an average (summed values and how many), Sum(total), "
                            "Max(value) or Min(value). A bare per-batch value cannot be merged across eval batches: "
                            "a mean of batch means weights a short last batch like a full one, and nothing says "
                            "whether to add, average or take the largest.")
        for leaf in value:
            if (shape := jnp.shape(leaf)) != ():
                raise ValueError(f"compute_metrics' metric {name!r} ({type(value).__name__}) has a leaf of shape "
                                 f"{shape}; a metric is a scalar: reduce it over the batch (jnp.sum of values and of "
                                 "weights in Mean(total, count), jnp.max in Max, ...).")
        checked_metrics[name] = numeric(value)
    return checked_metrics


def eval_key(state: TrainState, batch_index: jax.Array | int) -> jax.Array:
    """The loss's key for eval batch `batch_index`: `fold_in(stream_rng("eval"), batch_index)`, so every eval batch
    draws fresh noise and never a training step's key (`fold_in(step_rng(), micro_index)`)."""
    return jax.random.fold_in(state.stream_rng("eval"), jnp.asarray(batch_index, jnp.int32))


def numbered(compiled_eval: Any) -> Callable[..., Metrics]:
    """`compiled_eval(state, batch, batch_index)` (a `jax.jit` of `eval_step`, the index replicated) callable as
    `(state, batch)` too: the index defaults to 0, and goes in as an int32 array, so every index shares one compiled
    program. Under a trace (`jax.eval_shape` of the step, a caller's own `jax.jit`) the step's function runs inline:
    a jitted function nested in another trace cannot carry its XLA options."""

    @functools.wraps(compiled_eval)
    def call(state: TrainState, batch: Batch, batch_index: jax.Array | int = 0) -> Metrics:
        index = batch_index if isinstance(batch_index, jax.Array) else np.int32(batch_index)
        if any(isinstance(leaf, jax.core.Tracer) for leaf in jax.tree.leaves((state, batch, index))):
            return compiled_eval.__wrapped__(state, batch, index)
        return compiled_eval(state, batch, index)

    call.takes_batch_index = True  # type: ignore[attr-defined]  # read by `bound_eval`
    return call


def bound_eval(eval_step: Callable[..., Metrics], state: TrainState) -> Callable[[Batch, int], Metrics]:
    """`eval_step` of `state`, called as `(batch, batch_index)`: the index reaches a step that takes it (`numbered`);
    a `configure_functions` eval step of `(state, batch)` is called as it was written."""
    if getattr(eval_step, "takes_batch_index", False):
        return functools.partial(eval_step, state)
    return lambda batch, _index: eval_step(state, batch)


def eval_step(state: TrainState, batch: Batch, batch_index: jax.Array | int = 0, *, loss_fn: LossFn,
              metrics_fn: Callable[[Any, Batch], Metrics] | None = None) -> Metrics:
    """Metrics of one eval batch, the module in eval mode; padded rows must weigh nothing in the loss.

    `batch_index` (the batch's position in the eval pass, traced: one compile) picks the loss's key (`eval_key`).
    `metrics_fn(predictions, batch)` adds metrics computed from the loss's `predictions` (on device); of
    `DefaultMetrics`, those the loss already reports are left out.
    """
    rng = eval_key(state, batch_index)
    out = checked(called(loss_fn, state.model(train=False), batch, rng, False, state.frozen_views()))
    metrics = loss_metrics(out)
    if metrics_fn is not None:
        returned = metrics_fn(out.predictions, batch)
        if isinstance(returned, DefaultMetrics):
            returned = {name: value for name, value in returned.items() if name not in metrics}
        extra = checked_eval_metrics(returned)
        if clashes := sorted(set(extra) & set(metrics)):
            raise ValueError(f"compute_metrics returns {', '.join(map(repr, clashes))}, which the loss already "
                             "reports; drop them from eval_metrics (e.g. eval_metrics=['perplexity']), drop them "
                             "from the loss's own metrics, or rename one of the two.")
        metrics.update(extra)
    return metrics
