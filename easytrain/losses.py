"""Loss functions. Each returns a sum and the count it is normalised by, never a mean: the caller
divides once, after summing over micro-batches and devices, so the loss is the mean over every
supervised token (or example, or pair) of the global batch; a mean of per-example or per-micro-batch
means would weight short sequences more. Other metrics say how they reduce (`easytrain.metrics`).
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, NamedTuple

import jax
from flax import nnx

from easytrain.chunked_loss import chunked_token_scores, masked_token_sums, token_scores
from easytrain.eval_metrics import Predictions, TokenScores
from easytrain.metrics import Mean, Metric, Sum, divisor

Batch = Mapping[str, jax.Array]
Frozen = Mapping[str, Any]


class LossOutput(NamedTuple):
    """What a loss returns.

    Attributes:
        loss_sum: the loss summed over what it averages (supervised tokens, examples, pairs).
        count: how many of those; the step divides the global `loss_sum` by the global `count` once.
        metrics: name -> `easytrain.metrics` value (`Mean`, `Sum`, `Max`, `Min`, `Last`), each reduced its
            own way. A bare array is read as a sum over the same things as the loss (`Mean(value, count)`).
        predictions: `easytrain.eval_metrics.Predictions` (logits, labels, weights) that evaluation metrics
            chosen by name (`eval_metrics`) and `compute_metrics` score on device, or `TokenScores` (per-token
            cross-entropy and argmax hit, from a loss that never holds whole logits); None if not scorable.
    """

    loss_sum: jax.Array
    count: jax.Array
    metrics: Mapping[str, Metric | jax.Array] = {}
    predictions: Any = None

    @property
    def num_tokens(self) -> jax.Array:
        """`count`, under the name it has for token-level losses."""
        return self.count


#: `(model, batch, rng, train, frozen) -> LossOutput`; `frozen` maps names to frozen modules or pytrees.
LossFn = Callable[[nnx.Module, Batch, jax.Array, bool, Frozen], LossOutput]


def token_cross_entropy_sums(logits_BTV: jax.Array, targets_BT: jax.Array,
                             mask_BT: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Sum of masked token cross-entropies, supervised-token count and correct-argmax count.

    cross_entropy[b, t] = logsumexp(logits[b, t]) - logits[b, t, targets[b, t]], computed in float32.
    """
    return masked_token_sums(*token_scores(logits_BTV, targets_BT), mask_BT)


def model_logits(model: nnx.Module, batch: Batch) -> jax.Array:
    """Run a causal LM on the standard batch layout (padding and packing aware)."""
    return model(batch["input_ids"], attention_mask_BT=batch.get("attention_mask"),
                 segment_ids_BT=batch.get("segment_ids"), positions_BT=batch.get("positions"))


def model_hidden_states(model: nnx.Module, batch: Batch) -> jax.Array:
    """`model_logits`' final normed hidden states `[B*T, D]` (`model.hidden_states`), before the head."""
    return model.hidden_states(batch["input_ids"], attention_mask_BT=batch.get("attention_mask"),
                               segment_ids_BT=batch.get("segment_ids"), positions_BT=batch.get("positions"))


#: The fields of the batches `causal_lm_loss` reads (the default collate's token blocks).
LM_BATCH_FIELDS = ("input_ids", "targets", "loss_mask")


def check_lm_batch(batch: Batch) -> None:
    """A batch without the token fields is another kind of data than the default (causal-LM) loss trains on: say so
    and name the hook to override, instead of a `KeyError` deep in the loss."""
    if missing := [name for name in LM_BATCH_FIELDS if name not in batch]:
        raise ValueError(f"the default compute_loss is the causal-LM loss over batches of {', '.join(LM_BATCH_FIELDS)} "
                         f"(the default collate's); this batch lacks {', '.join(map(repr, missing))} (it has "
                         f"{', '.join(batch)}): override compute_loss to return LossOutput(loss_sum, count, metrics) "
                         "for your data.")


def causal_lm_loss(model: nnx.Module, batch: Batch, rng: jax.Array, train: bool,
                   frozen: Frozen | None = None, *, chunk_size: int = 0) -> LossOutput:
    """Next-token cross-entropy over the tokens where `loss_mask` is 1.

    Metrics: `num_tokens` (supervised tokens) and, in training, token `accuracy`; evaluation scores the
    returned predictions with the metrics `eval_metrics` names (accuracy and perplexity by default).

    With `chunk_size > 0` the model's head runs on that many tokens at a time from `model.hidden_states`
    (`easytrain.chunked_loss`; the model needs `hidden_states` and `logits_from_hidden`), so the float32
    logits `[B*T, V]` never exist; the predictions are then per-token `TokenScores`, not logits.
    """
    del rng, frozen  # the default objective is deterministic and uses no frozen model
    check_lm_batch(batch)
    targets_BT, mask_BT = batch["targets"], batch["loss_mask"]
    if chunk_size:
        nll_M, correct_M = chunked_token_scores(model.logits_from_hidden, model_hidden_states(model, batch),
                                                targets_BT.reshape(-1), chunk_size)
        nll_BT, correct_BT = nll_M.reshape(targets_BT.shape), correct_M.reshape(targets_BT.shape)
        loss_sum, count, correct = masked_token_sums(nll_BT, correct_BT, mask_BT)
        predictions: Any = TokenScores(nll_BT, correct_BT, mask_BT)
    else:
        logits_BTV = model_logits(model, batch)
        loss_sum, count, correct = token_cross_entropy_sums(logits_BTV, targets_BT, mask_BT)
        predictions = Predictions(logits_BTV, targets_BT, mask_BT)
    metrics: dict[str, Metric] = {"num_tokens": Sum(count)}
    if train:
        metrics["accuracy"] = Mean(correct, count)
    return LossOutput(loss_sum, count, metrics, predictions)


def safe_mean(total: jax.Array, count: jax.Array) -> jax.Array:
    """`total / count`, and 0 (not NaN) when nothing was supervised."""
    return total / divisor(count)
