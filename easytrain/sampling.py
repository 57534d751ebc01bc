"""Drawing one token from logits: temperature, then top-k, then top-p, as transformers orders them.

Pure functions of the logits, usable on their own; ``easytrain.generation`` decodes with them (and re-exports
them). Each works on the last axis, the vocabulary, of logits of any leading shape (``[V]``, ``[B, V]``,
``[B, T, V]``).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

Array = jax.Array


def filter_logits(logits_V: Array, top_k: int | None = None, top_p: float | None = None) -> Array:
    """Logits ``[..., V]`` with every token outside the top-k, then outside the top-p nucleus, of its row set to -inf.

    Top-p keeps, in decreasing probability order, each token whose preceding tokens hold less than
    ``top_p`` of the mass, and every token tied with the last one kept: a rule that does not depend on how ties
    are sorted. transformers' ``TopPLogitsWarper`` keeps the same set except at such ties, where it keeps the
    subset its sort order puts first.
    """
    if top_k is not None and top_k < logits_V.shape[-1]:
        kth_1 = jax.lax.top_k(logits_V, top_k)[0][..., -1:]
        logits_V = jnp.where(logits_V < kth_1, -jnp.inf, logits_V)
    if top_p is not None and top_p < 1:
        sorted_V = -jnp.sort(-logits_V, axis=-1)
        probs_V = jax.nn.softmax(sorted_V, axis=-1)
        before_V = jnp.cumsum(probs_V, axis=-1) - probs_V
        kept_1 = jnp.sum(before_V < top_p, axis=-1, keepdims=True)
        threshold_1 = jnp.take_along_axis(sorted_V, kept_1 - 1, axis=-1)
        logits_V = jnp.where(logits_V < threshold_1, -jnp.inf, logits_V)
    return logits_V


def scale_logits(logits_V: Array, temperature: float | Array) -> Array:
    """``logits / temperature`` in float32, less each row's largest logit: the same distribution, and at a
    temperature so small that the division overflows float32 (or the temperature underflows to 0) still its
    limit, all the mass on the row's largest logits, instead of +inf (or NaN) that would make the first of them
    to overflow, not the largest, the one drawn."""
    logits_V = logits_V.astype(jnp.float32)
    top_1 = jnp.max(logits_V, axis=-1, keepdims=True)
    return jnp.where(logits_V == top_1, 0.0, (logits_V - top_1) / temperature)


def sample_logits(
    logits_V: Array, rng: Array, temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None
) -> Array:
    """One token id per row of ``logits [..., V]`` drawn from ``softmax(filter_logits(logits / temperature))``,
    int32 of the leading shape ``[...]``. As the temperature goes to 0 this is the argmax (ties drawn evenly)."""
    filtered_V = filter_logits(scale_logits(logits_V, temperature), top_k, top_p)
    return jax.random.categorical(rng, filtered_V, axis=-1).astype(jnp.int32)
