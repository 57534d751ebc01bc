"""Metrics that know how they reduce.

A loss returns each metric as a small pytree that says how to combine it with another partial value
of itself: `Mean` (a sum with its own count: per token, per example, per pair, ...), `ExpMean`
(perplexity), `Sum`, `Max`, `Min`, `Last`. Inside a compiled step the values are already global over
devices and processes (the loss sees global arrays); gradient accumulation, a logging window of steps and
the batches of an evaluation merge partial values with `merge`, and `result` divides once at the end. So every metric
is exact whatever the micro-batch split, device count or eval batch size, and no name is special.
"""

from __future__ import annotations

import math
from typing import Any, Mapping, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np


class Mean(NamedTuple):
    """`total / count` once all partial values are merged; 0 (not NaN) when `count` is 0."""

    total: Any
    count: Any

    def merge(self, other: "Mean") -> "Mean":
        return Mean(self.total + other.total, self.count + other.count)

    def result(self) -> float:
        count = float(self.count)
        return float(self.total) / count if count != 0 else 0.0


class ExpMean(NamedTuple):
    """`exp(total / count)`: perplexity from summed token cross-entropies (capped to stay finite)."""

    total: Any
    count: Any

    def merge(self, other: "ExpMean") -> "ExpMean":
        return ExpMean(self.total + other.total, self.count + other.count)

    def result(self) -> float:
        return math.exp(min(Mean(self.total, self.count).result(), 700.0))


class Sum(NamedTuple):
    """A total, e.g. supervised tokens or skipped steps."""

    total: Any

    def merge(self, other: "Sum") -> "Sum":
        return Sum(self.total + other.total)

    def result(self) -> float:
        return float(self.total)


class Max(NamedTuple):
    """The largest value of a window or an evaluation, e.g. a worst-case gradient norm that a mean would hide. A NaN
    in any part makes the whole NaN, on device and on the host alike: a diverging step shows in its log."""

    value: Any

    def merge(self, other: "Max") -> "Max":
        return Max(_ops(self.value, other.value).maximum(self.value, other.value))

    def result(self) -> float:
        return float(self.value)


class Min(NamedTuple):
    """The smallest value of a window or an evaluation, e.g. the lowest reward of a batch. NaN propagates as in
    `Max`."""

    value: Any

    def merge(self, other: "Min") -> "Min":
        return Min(_ops(self.value, other.value).minimum(self.value, other.value))

    def result(self) -> float:
        return float(self.value)


class Last(NamedTuple):
    """The most recent value, e.g. the learning rate of the last step of a logging window."""

    value: Any

    def merge(self, other: "Last") -> "Last":
        return other

    def result(self) -> float:
        return float(self.value)


Metric = Mean | ExpMean | Sum | Max | Min | Last
METRIC_TYPES = (Mean, ExpMean, Sum, Max, Min, Last)


def _ops(*values: Any) -> Any:
    """`jnp` for device (or traced) values, `np` for fetched ones, which stay on the host: both propagate NaN as a
    compiled step does (Python's `max` keeps its first argument when the other is NaN)."""
    return jnp if any(isinstance(value, jax.Array) for value in values) else np


def is_metric(value: Any) -> bool:
    """Whether `value` already says how it merges: a loss's bare value is taken as a sum over the loss's count
    (`Mean(value, count)`), and `compute_metrics` refuses one (nothing says whether to add, average or take the
    largest across eval batches)."""
    return isinstance(value, METRIC_TYPES)


def numeric(metric: Metric) -> Metric:
    """`metric` with boolean leaves as int32: a `Sum` of flags counts them (adding booleans would be a logical or)
    and a `Max` or `Min` of flags has an identity."""
    return type(metric)(*(jnp.asarray(leaf, jnp.int32) if jnp.asarray(leaf).dtype == jnp.bool_ else leaf
                          for leaf in metric))


def divisor(count: jax.Array) -> jax.Array:
    """`count` to divide a sum by: 1 where it is 0 (a mean over nothing is 0, not NaN). Any other count divides as it
    is, one below 1 too (fractional weights)."""
    return jnp.where(count == 0, jnp.ones_like(count), count)


def mean_over(values: jax.Array, weights: jax.Array | None = None) -> Mean:
    """Mean of `values` (per token, example or pair) weighted by a 0/1 mask: padding rows weigh 0."""
    values = values.astype(jnp.float32)
    if weights is None:
        return Mean(jnp.sum(values), jnp.asarray(values.size, jnp.float32))
    weights = weights.astype(jnp.float32)
    return Mean(jnp.sum(values * weights), jnp.sum(weights))


def identity(metric: Metric) -> Metric:
    """The value that `merge` leaves any partial value unchanged with (shapes and dtypes of `metric`)."""
    def fill(leaf: Any, value: float) -> jax.Array:
        return jnp.full(leaf.shape, value, leaf.dtype)

    if isinstance(metric, Max):
        return Max(fill(metric.value, -jnp.inf if jnp.issubdtype(metric.value.dtype, jnp.floating)
                        else jnp.iinfo(metric.value.dtype).min))
    if isinstance(metric, Min):
        return Min(fill(metric.value, jnp.inf if jnp.issubdtype(metric.value.dtype, jnp.floating)
                        else jnp.iinfo(metric.value.dtype).max))
    return type(metric)(*(fill(leaf, 0) for leaf in metric))


def identities(metrics: Mapping[str, Metric]) -> dict[str, Metric]:
    """`identity` of every metric: the start of an accumulation."""
    return {key: identity(value) for key, value in metrics.items()}


def merge_all(metrics: Mapping[str, Metric], other: Mapping[str, Metric]) -> dict[str, Metric]:
    """Key-wise merge of two metric dicts with the same keys (works on device arrays and on fetched numbers)."""
    return {key: value.merge(other[key]) for key, value in metrics.items()}


def reduce_window(window: Sequence[Mapping[str, Metric]], prefix: str = "") -> dict[str, float]:
    """Merge a sequence of fetched metric dicts (steps of a log window, or eval batches) and take results."""
    if not window:
        return {}
    merged = dict(window[0])
    for metrics in window[1:]:
        merged = merge_all(merged, metrics)
    return {f"{prefix}{key}": value.result() for key, value in merged.items()}


def fetch(metrics: Any) -> Any:
    """`jax.device_get`: each device value as a numpy array, the metric types kept (NamedTuples survive tree
    mapping), leaves already on the host as they are. One pass over the leaves: a log reads every step's metrics
    since the last (9 arrays a step; a second pass converting them again cost a quarter more)."""
    return jax.device_get(metrics)
