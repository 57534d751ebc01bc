"""Pure attention math: rotary embeddings, masks (causal, padding, packing, sliding window), and
grouped-query attention. Shape suffixes as in ``easytrain.models.llama``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from easytrain.models.maxima import softmax
from easytrain.models.rope import RopeScaling

Array = jax.Array
DType = jnp.dtype | type


def rope_tables(positions_BT: Array, head_dim: int, theta: float, dtype: DType,
                scaling: RopeScaling | None = None) -> tuple[Array, Array]:
    """Cos/sin tables in rotate-half layout (frequencies repeated, not interleaved); `scaling`: a long-context
    checkpoint's scaled frequencies (`easytrain.models.rope`), computed on the host.

    Angles are computed in float32 and only then cast, so low-precision compute
    does not lose positional resolution.
    """
    if scaling is None:
        exponents_K2 = jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim
        inv_freq_K2 = 1.0 / (theta**exponents_K2)
    else:
        inv_freq_K2 = jnp.asarray(scaling.inverse_frequencies(head_dim, theta))
    angles_BTK2 = positions_BT.astype(jnp.float32)[..., None] * inv_freq_K2
    angles_BTK = jnp.concatenate([angles_BTK2, angles_BTK2], axis=-1)
    cos_BTK, sin_BTK = jnp.cos(angles_BTK), jnp.sin(angles_BTK)
    if scaling is not None and scaling.attention_factor != 1.0:  # YaRN's temperature, on both tables as transformers
        cos_BTK, sin_BTK = cos_BTK * scaling.attention_factor, sin_BTK * scaling.attention_factor
    if jax.default_backend() == "cpu":
        cos_BTK, sin_BTK = _computed_once(cos_BTK, sin_BTK)
    return cos_BTK.astype(dtype), sin_BTK.astype(dtype)


def _computed_once(cos_BTK: Array, sin_BTK: Array) -> tuple[Array, Array]:
    """The same tables, as one buffer XLA:CPU fills once per step.

    Left alone, XLA:CPU fuses `cos` and `sin` into every consumer, so each layer's query and key rotation,
    forward and backward, recomputes them for every head: 24 of each in the benchmark Llama's train step,
    about 5% of its time (docs/benchmarks.md). A stack is a concatenation, which XLA:CPU does not fuse into
    the consumers' loops; the `reduce_precision` to float32's own format (an identity) keeps the simplifier
    from folding each slice of the stack back into the `cos` or `sin` it came from.
    """
    both_2BTK = jax.lax.reduce_precision(jnp.stack([cos_BTK, sin_BTK]), exponent_bits=8, mantissa_bits=23)
    return both_2BTK[0], both_2BTK[1]


def apply_rope(x_BTHK: Array, cos_BTK: Array, sin_BTK: Array) -> Array:
    """Rotates each head's (first half, second half) pairs by the position angle."""
    first_BTHK2, second_BTHK2 = jnp.split(x_BTHK, 2, axis=-1)
    rotated_BTHK = jnp.concatenate([-second_BTHK2, first_BTHK2], axis=-1)
    return x_BTHK * cos_BTK[:, :, None, :] + rotated_BTHK * sin_BTK[:, :, None, :]


def causal_mask(query_index_T: Array, key_index_S: Array, sliding_window: int | None = None) -> Array:
    """Boolean ``[T, S]``: the key is at or before the query and, given a window, inside it.

    Same boundary as transformers' ``sliding_window_overlay`` (``key > query - window``): a
    window of W tokens sees the query itself and the W - 1 tokens before it.
    """
    offset_TS = query_index_T[:, None] - key_index_S[None, :]
    if sliding_window is None:
        return offset_TS >= 0
    return (offset_TS >= 0) & (offset_TS < sliding_window)


def attention_mask(
    batch: int,
    length: int,
    attention_mask_BT: Array | None = None,
    segment_ids_BT: Array | None = None,
    sliding_window: int | None = None,
) -> Array:
    """Boolean ``[B, T, S]`` mask: causal (within ``sliding_window``), key is a real token, same segment.

    Causality and the window follow sequence order, not ``positions``, so packed
    documents with restarted positions stay causal.
    """
    index_T = jnp.arange(length)
    mask_BTS = jnp.broadcast_to(causal_mask(index_T, index_T, sliding_window), (batch, length, length))
    if attention_mask_BT is not None:
        mask_BTS = mask_BTS & (attention_mask_BT[:, None, :] != 0)
    if segment_ids_BT is not None:
        mask_BTS = mask_BTS & (segment_ids_BT[:, :, None] == segment_ids_BT[:, None, :])
    return mask_BTS


def cached_attention_mask(
    query_positions_BT: Array, key_positions_BS: Array, sliding_window: int | None = None
) -> Array:
    """Boolean ``[B, T, S]`` mask over cache slots: ``causal_mask`` applied to positions, key real.

    Decoding compares positions, not slots, because a row's slots may hold padding between its
    tokens; padding (position -1) is never a key, and a padding query attends to nothing.
    """
    mask_BTS = jax.vmap(causal_mask, in_axes=(0, 0, None))(query_positions_BT, key_positions_BS, sliding_window)
    return mask_BTS & (key_positions_BS[:, None, :] >= 0)


def grouped_attention(q_BTNGK: Array, k_BSNK: Array, v_BSNK: Array, mask_BTS: Array) -> Array:
    """Softmax attention where each key/value head serves G query heads.

    Heads are moved ahead of time and the G query heads of a group are folded into the query axis,
    so both products are plain batched matmuls (about 7% faster end to end on XLA:CPU than
    contracting the 5-D layout directly). Scores and softmax are float32. A fully masked query
    row (padding) gets a uniform distribution instead of NaN, because masked scores are a finite
    minimum rather than -inf.
    """
    batch, length, kv_heads, group, head_dim = q_BTNGK.shape
    q_BNQK = jnp.transpose(q_BTNGK, (0, 2, 3, 1, 4)).reshape(batch, kv_heads, group * length, head_dim)
    k_BNSK, v_BNSK = jnp.transpose(k_BSNK, (0, 2, 1, 3)), jnp.transpose(v_BSNK, (0, 2, 1, 3))
    scores_BNQS = jnp.einsum("bnqk,bnsk->bnqs", q_BNQK, k_BNSK, preferred_element_type=jnp.float32)
    scores_BNGTS = scores_BNQS.reshape(batch, kv_heads, group, length, -1) * head_dim**-0.5
    scores_BNGTS = jnp.where(mask_BTS[:, None, None], scores_BNGTS, jnp.finfo(jnp.float32).min)
    probs_BNQS = softmax(scores_BNGTS, axis=-1).astype(v_BSNK.dtype).reshape(scores_BNQS.shape)
    out_BNQK = jnp.einsum("bnqs,bnsk->bnqk", probs_BNQS, v_BNSK)
    return jnp.transpose(out_BNQK.reshape(batch, kv_heads, group, length, head_dim), (0, 3, 1, 2, 4))


def causal_grouped_attention(q_BTNGK: Array, k_BTNK: Array, v_BTNK: Array, mask_BTS: Array, *,
                             query_blocks: int) -> Array:
    """`grouped_attention` of self-attention under a mask that is causal in sequence order (no query sees a
    later key, as every mask `attention_mask` builds), skipping the scores no query can see.

    The queries are cut into ``query_blocks`` equal blocks; block ``i`` is scored against the keys up to its
    own end only, so with 2 blocks the score and value products and the softmax cover 3/4 of ``[T, S]``
    (the benchmark Llama's train step: 1.05x faster on XLA:CPU, compile 1.2x longer). The skipped scores
    are masked, so every query that sees a key gets the same output; one that sees none (padding before a
    row's first token) gets the uniform average of every value, as in `grouped_attention`.
    """
    length = q_BTNGK.shape[1]
    if query_blocks <= 1 or length % query_blocks:
        return grouped_attention(q_BTNGK, k_BTNK, v_BTNK, mask_BTS)
    size = length // query_blocks
    out_BTNGK = jnp.concatenate([
        grouped_attention(q_BTNGK[:, start:start + size], k_BTNK[:, :start + size], v_BTNK[:, :start + size],
                          mask_BTS[:, start:start + size, :start + size])
        for start in range(0, length, size)], axis=1)
    sees_none_BT = ~jnp.any(mask_BTS, axis=-1)
    mean_B1N1K = jnp.mean(v_BTNK, axis=1, dtype=jnp.float32).astype(out_BTNGK.dtype)[:, None, :, None, :]
    return jnp.where(sees_none_BT[:, :, None, None, None], mean_B1N1K, out_BTNGK)
