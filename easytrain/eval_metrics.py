"""Evaluation metrics chosen by name (`eval_metrics`), computed on device from a loss's predictions.

A loss that can be scored returns `LossOutput(..., predictions=Predictions(logits, labels, weights))`, or
`TokenScores` when it never holds whole logits (`loss_chunk_size`); each metric here turns one micro-batch's
predictions into an `easytrain.metrics` value that merges exactly across batches, devices and hosts, so
nothing the size of the logits ever leaves the device.
Generation metrics (`exact_match`) need prompts with reference answers and run on the host instead,
as evaluators of the trainers that have them.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp

from easytrain.chunked_loss import masked_token_sums, token_scores
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


class TokenScores(NamedTuple):
    """Per-position scores that stand in for `Predictions` when the logits are never whole (a loss computed a few
    tokens at a time, `loss_chunk_size`): `accuracy` and `perplexity` read them and give the same values.

    Attributes:
        nll: `[...]` float32 cross-entropy of the label, `logsumexp(logits) - logits[label]`.
        correct: `[...]` 1.0 where the top-scoring class is the label, else 0.0.
        weights: `[...]` as in `Predictions`.
    """

    nll: jax.Array
    correct: jax.Array
    weights: jax.Array


def scores(predictions: Predictions | TokenScores) -> TokenScores:
    """Per-position cross-entropy and argmax hit of `predictions` (`TokenScores` pass through)."""
    if isinstance(predictions, TokenScores):
        return predictions
    return TokenScores(*token_scores(predictions.logits, predictions.labels), predictions.weights)


def accuracy(predictions: Predictions | TokenScores) -> Mean:
    """Share of weighted positions whose top-scoring class is the label."""
    scored = scores(predictions)
    weights = scored.weights.astype(jnp.float32)
    return Mean(jnp.sum(scored.correct * weights), jnp.sum(weights))


def perplexity(predictions: Predictions | TokenScores) -> ExpMean:
    """`exp` of the weighted mean cross-entropy of the labels, in float32: `exp` of the loss. Positions of weight 0
    are selected away as the loss does (`masked_token_sums`): a label marked ignored by an id outside the classes
    (-100) scores NaN there, and NaN * 0 is NaN."""
    nll, count, _ = masked_token_sums(*scores(predictions))
    return ExpMean(nll, count)


#: Metrics computed inside the compiled eval step from `Predictions`.
ON_DEVICE: dict[str, Callable[[Predictions], Metric]] = {"accuracy": accuracy, "perplexity": perplexity}
#: Metrics computed on the host by generating answers (trainers with prompts and references add them).
GENERATED = ("exact_match",)
#: The on-device metrics evaluated when `eval_metrics` is not set and the loss returns predictions.
DEFAULT = ("accuracy", "perplexity")
NAMES = (*ON_DEVICE, *GENERATED)


def on_device_metrics(names: tuple[str, ...], predictions: Predictions | TokenScores | None,
                      requested: bool) -> dict[str, Any]:
    """The on-device metrics among `names` for one micro-batch.

    Raises:
        ValueError: `requested` names need predictions and the loss returned none.
        TypeError: the loss returned predictions of another kind (bare logits), which these metrics cannot read.
    """
    names = tuple(name for name in names if name in ON_DEVICE)
    if predictions is None:
        if requested and names:
            raise ValueError(f"{list(names)} need the loss to return LossOutput(..., predictions=Predictions(logits, "
                             "labels, weights)); this trainer's compute_loss returns none")
        return {}
    if names and not isinstance(predictions, (Predictions, TokenScores)):
        raise TypeError(unscorable(predictions, names))
    return {name: ON_DEVICE[name](predictions) for name in names}


def unscorable(predictions: Any, names: tuple[str, ...]) -> str:
    """Why the default metrics cannot read `predictions`, and the two ways out (a bare array would otherwise fail
    deep in the tracing as an attribute error)."""
    shape = f" of shape {tuple(predictions.shape)}" if hasattr(predictions, "shape") else ""
    kind = "jax.Array" if isinstance(predictions, jax.Array) else type(predictions).__name__
    return (f"compute_loss returned LossOutput.predictions as a {kind}{shape}, but the default compute_metrics "
            f"({', '.join(names)}) reads easytrain.eval_metrics.Predictions or TokenScores; wrap it as "
            "predictions=Predictions(logits, labels, weights) (weights 0 for padding rows), or override "
            "compute_metrics(predictions, batch) to score it your own way (or set eval_metrics='none').")
