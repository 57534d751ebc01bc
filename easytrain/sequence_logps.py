"""Log-probabilities of target tokens, and their sums over completions: what the preference losses
(`easytrain.preference`, which re-exports these) are computed from.

The per-token log-probability is `logits[target] − logsumexp(logits)` in float32, its logsumexp read one vocabulary
chunk at a time, so neither a float32 `[B, T, V]` copy of bfloat16 logits (`token_logps`) nor any `[B, T, V]` at all
(`token_logps_from_hidden`, projecting the hidden states chunk by chunk) is ever held.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

from easytrain.models.maxima import shift_max

Array = jax.Array


def _chunked_logps(chunk_fn: Callable[..., Array], operands: Any, targets_BT: Array,
                   vocab_size: int, chunk_size: int) -> tuple[Array, Array]:
    """(logit[target], logsumexp(logits)) in float32, the logsumexp online (running max, rescaled sum),
    reading one [B, T, C] vocabulary chunk at a time from `chunk_fn(operands, offset, C)`."""
    size = min(chunk_size, vocab_size)

    def body(carry, i):
        max_BT, sum_BT, target_BT = carry
        operands_i = _tied_to_step(operands, i)
        start = i * size
        offset = jnp.minimum(start, vocab_size - size)  # a short last chunk overlaps the one before it
        cols_C = offset + jnp.arange(size)
        new_C = cols_C >= start  # columns no earlier chunk has counted
        chunk_BTC = jnp.where(new_C, chunk_fn(operands_i, offset, size).astype(jnp.float32), -jnp.inf)
        new_max_BT = lax.stop_gradient(jnp.maximum(max_BT, shift_max(chunk_BTC)))  # logsumexp does not depend on it
        shift_BT = _finite_or_zero(new_max_BT)  # no −inf − (−inf) while a row has seen only −inf logits
        sum_BT = sum_BT * jnp.exp(max_BT - shift_BT) + jnp.exp(chunk_BTC - shift_BT[..., None]).sum(-1)
        hit_BTC = new_C & (cols_C == targets_BT[..., None])
        target_BT = target_BT + jnp.where(hit_BTC, chunk_BTC, 0.0).sum(-1)  # one non-zero term: exact
        return (new_max_BT, sum_BT, target_BT), None

    zeros_BT = jnp.zeros(targets_BT.shape, jnp.float32)
    n_chunks = -(-vocab_size // size)
    (max_BT, sum_BT, target_BT), _ = lax.scan(jax.checkpoint(body, prevent_cse=False),
                                              (zeros_BT - jnp.inf, zeros_BT, zeros_BT), jnp.arange(n_chunks))
    return target_BT, _finite_or_zero(max_BT) + jnp.log(sum_BT)


@jax.custom_vjp
def _tied_to_step(operands: Any, i: Array) -> Any:
    """`operands`, made to look as if they depended on the loop step `i`: keeps XLA from hoisting whole-array
    work out of the loop (XLA:CPU upcasts all of a bfloat16 operand to slice it).

    The barrier is for the forward pass only; its cotangent passes straight through. jax transposes
    `optimization_barrier` into a barrier on the cotangents, and jax 0.11 passes the gradient accumulators
    through it as well, which keeps XLA from adding each chunk's gradient into them in place: one more whole
    `[D, V]` buffer for an unembedding's gradient (`tests/test_preference_losses.py`)."""
    return lax.optimization_barrier((operands, i))[0]


def _tied_forward(operands: Any, i: Array) -> tuple[Any, None]:
    return _tied_to_step(operands, i), None


def _untied_backward(_: None, cotangent: Any) -> tuple[Any, None]:
    return cotangent, None


_tied_to_step.defvjp(_tied_forward, _untied_backward)


def _finite_or_zero(x: Array) -> Array:
    return jnp.where(jnp.isneginf(x), 0.0, x)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def token_logps(logits_BTV: Array, targets_BT: Array, chunk_size: int = 4096) -> Array:
    """Float32 log p(target) = logits[target] − logsumexp(logits), never holding a float32 [B, T, V].

    The logsumexp runs over `chunk_size` vocabulary columns at a time (any `chunk_size`, dividing V or
    not); the gradient `g·(onehot(target) − softmax)` is one fused elementwise pass in the logits' dtype.

    Args:
        logits_BTV: next-token logits, any float dtype (bfloat16 is read in chunks, upcast per chunk).
        targets_BT: int token ids; ids outside [0, V) give −logsumexp (mask them in `sequence_logps`).
        chunk_size: vocabulary columns per step; the temporary memory is about 2·B·T·chunk_size·4 bytes.
    Returns:
        logps_BT: float32.
    """
    return _token_logps_fwd(logits_BTV, targets_BT, chunk_size)[0]


def _token_logps_fwd(logits_BTV, targets_BT, chunk_size):
    target_BT, log_z_BT = _chunked_logps(lambda x, offset, size: lax.dynamic_slice_in_dim(x, offset, size, -1),
                                         logits_BTV, targets_BT, logits_BTV.shape[-1], chunk_size)
    return target_BT - log_z_BT, (logits_BTV, targets_BT, log_z_BT)


def _token_logps_bwd(chunk_size, residuals, g_BT):
    """g·(onehot(target) − softmax): one elementwise pass, written straight in the logits' dtype."""
    logits_BTV, targets_BT, log_z_BT = residuals
    onehot_BTV = jnp.arange(logits_BTV.shape[-1]) == targets_BT[..., None]
    softmax_BTV = jnp.exp(logits_BTV.astype(jnp.float32) - log_z_BT[..., None])
    return ((onehot_BTV - softmax_BTV) * g_BT[..., None]).astype(logits_BTV.dtype), None


token_logps.defvjp(_token_logps_fwd, _token_logps_bwd)


def token_logps_from_hidden(hidden_BTD: Array, unembed: Array | Callable[..., Array],
                            targets_BT: Array, chunk_size: int = 4096,
                            vocab_size: int | None = None) -> Array:
    """`token_logps` of `hidden @ unembed` projected one vocabulary chunk at a time: no [B, T, V] ever.

    Each chunk's logits are recomputed in the backward pass (`jax.checkpoint`), so neither pass keeps more
    than a couple of [B, T, chunk_size] float32 blocks; plain JAX autodiff, so `unembed` may be a module.

    Args:
        hidden_BTD: final hidden states (after the last norm).
        unembed: the output projection `unembed_DV`, or a callable `(hidden_BTD, offset, size) -> logits_BTC`
            giving the logits of vocabulary columns [offset, offset + size) (then pass `vocab_size`).
        targets_BT: as in `token_logps`.
        chunk_size: as in `token_logps`.
        vocab_size: the vocabulary size, needed when `unembed` is a callable.
    Returns:
        logps_BT: float32.
    """
    if callable(unembed):
        if vocab_size is None:
            raise ValueError("token_logps_from_hidden: pass vocab_size with a callable unembed")
        project, operands = unembed, hidden_BTD
    else:
        vocab_size, operands = unembed.shape[1], (hidden_BTD, unembed)

        def project(operands, offset, size):
            hidden_BTD, unembed_DV = operands
            unembed_DC = lax.dynamic_slice_in_dim(unembed_DV, offset, size, 1)
            return jnp.dot(hidden_BTD, unembed_DC, preferred_element_type=jnp.float32)
    target_BT, log_z_BT = _chunked_logps(project, operands, targets_BT, vocab_size, chunk_size)
    return target_BT - log_z_BT


def sequence_logps(logps_BT: Array, mask_BT: Array) -> tuple[Array, Array]:
    """Σ_t logps[b, t] over completion tokens (mask 1) and their count; padding values never leak in.

    The sum is a float32 reduction over T, so a different padding length can reassociate it (rounding only).
    """
    keep_BT = mask_BT.astype(bool)
    return jnp.sum(jnp.where(keep_BT, logps_BT, 0.0), -1), jnp.sum(keep_BT, -1, dtype=jnp.float32)
