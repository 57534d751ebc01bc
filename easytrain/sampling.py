"""Drawing one token from logits: temperature, then top-k, then top-p, as transformers orders them.

Pure functions of the logits, usable on their own; ``easytrain.generation`` decodes with them (and re-exports
them).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

Array = jax.Array


def filter_logits(logits_BV: Array, top_k: int | None = None, top_p: float | None = None) -> Array:
    """Logits with every token outside the top-k, then outside the top-p nucleus, set to -inf.

    Top-p keeps, in decreasing probability order, each token whose preceding tokens hold less than
    ``top_p`` of the mass, and every token tied with the last one kept: a rule that does not depend on how ties
    are sorted. transformers' ``TopPLogitsWarper`` keeps the same set except at such ties, where it keeps the
    subset its sort order puts first.
    """
    if top_k is not None and top_k < logits_BV.shape[-1]:
        kth_B1 = jax.lax.top_k(logits_BV, top_k)[0][:, -1:]
        logits_BV = jnp.where(logits_BV < kth_B1, -jnp.inf, logits_BV)
    if top_p is not None and top_p < 1:
        sorted_BV = -jnp.sort(-logits_BV, axis=-1)
        probs_BV = jax.nn.softmax(sorted_BV, axis=-1)
        before_BV = jnp.cumsum(probs_BV, axis=-1) - probs_BV
        kept_B1 = jnp.sum(before_BV < top_p, axis=-1, keepdims=True)
        threshold_B1 = jnp.take_along_axis(sorted_BV, kept_B1 - 1, axis=-1)
        logits_BV = jnp.where(logits_BV < threshold_B1, -jnp.inf, logits_BV)
    return logits_BV


def sample_logits(
    logits_BV: Array, rng: Array, temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None
) -> Array:
    """One token id per row drawn from ``softmax(filter_logits(logits / temperature))``, int32 ``[B]``."""
    filtered_BV = filter_logits(logits_BV.astype(jnp.float32) / temperature, top_k, top_p)
    return jax.random.categorical(rng, filtered_BV, axis=-1).astype(jnp.int32)
