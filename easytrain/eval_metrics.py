"""Evaluation metrics chosen by name (`eval_metrics`), computed on device from a loss's predictions.

A loss that can be scored returns `LossOutput(..., predictions=Predictions(logits, labels, weights))`;
each metric here turns one micro-batch's predictions into an `easytrain.metrics` value that merges
exactly across batches, devices and hosts, so nothing the size of the logits ever leaves the device.
Generation metrics (`exact_match`) need prompts with reference answers and run on the host instead,
as evaluators of the trainers that have them.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp

from easytrain.metrics import ExpMean, Mean, Metric


class Predictions(NamedTuple):
    """What the model predicted where it is scored.

    Attributes:
        logits: `[..., C]` scores over C classes (the vocabulary, for a language model).
        labels: `[...]` integer targets.
        weights: `[...]` how much each position counts (0 for padding and unsupervised tokens).
    """

    logits: jax.Array
    labels: jax.Array
    weights: jax.Array


def accuracy(predictions: Predictions) -> Mean:
    """Share of weighted positions whose top-scoring class is the label."""
    weights = predictions.weights.astype(jnp.float32)
    correct = jnp.argmax(predictions.logits, axis=-1) == predictions.labels
    return Mean(jnp.sum(correct * weights), jnp.sum(weights))


def perplexity(predictions: Predictions) -> ExpMean:
    """`exp` of the weighted mean cross-entropy of the labels, in float32."""
    logits = predictions.logits.astype(jnp.float32)
    weights = predictions.weights.astype(jnp.float32)
    log_z = jax.nn.logsumexp(logits, axis=-1)
    label_logit = jnp.take_along_axis(logits, predictions.labels[..., None], axis=-1)[..., 0]
    return ExpMean(jnp.sum((log_z - label_logit) * weights), jnp.sum(weights))


#: Metrics computed inside the compiled eval step from `Predictions`.
ON_DEVICE: dict[str, Callable[[Predictions], Metric]] = {"accuracy": accuracy, "perplexity": perplexity}
#: Metrics computed on the host by generating answers (trainers with prompts and references add them).
GENERATED = ("exact_match",)
#: The on-device metrics evaluated when `eval_metrics` is not set and the loss returns predictions.
DEFAULT = ("accuracy", "perplexity")
NAMES = (*ON_DEVICE, *GENERATED)


def on_device_metrics(names: tuple[str, ...], predictions: Predictions | None, requested: bool) -> dict[str, Any]:
    """The on-device metrics among `names` for one micro-batch.

    Raises:
        ValueError: `requested` names need predictions and the loss returned none.
    """
    names = tuple(name for name in names if name in ON_DEVICE)
    if predictions is None:
        if requested and names:
            raise ValueError(f"{list(names)} need the loss to return LossOutput(..., predictions=Predictions(logits, "
                             "labels, weights)); this trainer's compute_loss returns none")
        return {}
    return {name: ON_DEVICE[name](predictions) for name in names}
