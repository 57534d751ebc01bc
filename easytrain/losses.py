"""Loss functions. Each returns sums and a token count, never a mean: the caller divides once,
after summing over micro-batches and devices, so the loss is the mean over every supervised token
of the global batch (a mean of per-example or per-micro-batch means would weight short sequences
more).
"""

from __future__ import annotations

from typing import Callable, Mapping, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

Batch = Mapping[str, jax.Array]


class LossOutput(NamedTuple):
    """`loss_sum` over supervised tokens, their count, and extra metric *sums* (divided by `num_tokens`)."""

    loss_sum: jax.Array
    num_tokens: jax.Array
    metric_sums: dict[str, jax.Array] = {}


LossFn = Callable[[nnx.Module, Batch, jax.Array, bool], LossOutput]


def token_cross_entropy_sums(logits_BTV: jax.Array, targets_BT: jax.Array,
                             mask_BT: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Sum of masked token cross-entropies, supervised-token count and correct-argmax count.

    cross_entropy[b, t] = logsumexp(logits[b, t]) - logits[b, t, targets[b, t]], computed in float32.
    """
    logits_BTV = logits_BTV.astype(jnp.float32)
    mask_BT = mask_BT.astype(jnp.float32)
    log_z_BT = jax.nn.logsumexp(logits_BTV, axis=-1)
    target_logit_BT = jnp.take_along_axis(logits_BTV, targets_BT[..., None], axis=-1)[..., 0]
    loss_sum = jnp.sum((log_z_BT - target_logit_BT) * mask_BT)
    correct = jnp.sum((jnp.argmax(logits_BTV, axis=-1) == targets_BT) * mask_BT)
    return loss_sum, jnp.sum(mask_BT), correct


def model_logits(model: nnx.Module, batch: Batch) -> jax.Array:
    """Run a causal LM on the standard batch layout (padding and packing aware)."""
    return model(batch["input_ids"], attention_mask_BT=batch.get("attention_mask"),
                 segment_ids_BT=batch.get("segment_ids"), positions_BT=batch.get("positions"))


def causal_lm_loss(model: nnx.Module, batch: Batch, rng: jax.Array, train: bool) -> LossOutput:
    """Next-token cross-entropy over the tokens where `loss_mask` is 1."""
    del rng, train  # the default objective is deterministic
    loss_sum, count, correct = token_cross_entropy_sums(model_logits(model, batch), batch["targets"],
                                                        batch["loss_mask"])
    return LossOutput(loss_sum, count, {"accuracy": correct})


def safe_mean(total: jax.Array, count: jax.Array) -> jax.Array:
    """`total / count`, and 0 (not NaN) when nothing was supervised."""
    return total / jnp.maximum(count, 1.0)

