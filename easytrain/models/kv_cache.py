"""Static-shape key/value cache for incremental decoding.

Every array keeps its shape from the first step to the last, so one compiled decoding step serves
every position. New keys and values go into the slots from a write index shared by all rows, with
``lax.dynamic_update_slice``.

Each slot also records the RoPE position of the token it holds, or -1 for padding and unwritten
slots. Decoding masks are computed from query and key *positions*, not slot numbers, so a batch can
mix prompts of different lengths, left- or right-padded: padding slots are never attended and each
row sees exactly the keys it would see alone.

Shape suffixes as in ``llama.py``: L layers, B batch, T new tokens, S cache slots, N key/value heads, K head
dim.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from easytrain.errors import EasytrainError

Array = jax.Array


class CacheOverflowError(EasytrainError, ValueError):
    """More tokens written into a key/value cache than it has slots."""


class LayerCache(NamedTuple):
    """One attention layer's slice of the cache, as its ``__call__`` reads and returns it.

    With ``layer`` set, ``keys``/``values`` are the whole stacked cache ``[L, B, S, N, K]`` and the layer
    reads and writes its own slice of it in place (decoding stacked layers as one scan); otherwise they
    are this layer's ``[B, S, N, K]``.
    """

    keys: Array
    values: Array
    index: Array  # Slot where this call's first new token goes.
    layer: Array | None = None

    @property
    def keys_BSNK(self) -> Array:
        return self.keys if self.layer is None else self.keys[self.layer]

    @property
    def values_BSNK(self) -> Array:
        return self.values if self.layer is None else self.values[self.layer]

    def _written(self, cache: Array, new_BTNK: Array) -> Array:
        new_BTNK = new_BTNK.astype(cache.dtype)
        if self.layer is None:
            return jax.lax.dynamic_update_slice_in_dim(cache, new_BTNK, self.index, axis=1)
        zero = jnp.zeros((), jnp.int32)  # only the new tokens are written, into this layer's slice
        return jax.lax.dynamic_update_slice(cache, new_BTNK[None], (self.layer, zero, self.index, zero, zero))

    def write(self, k_BTNK: Array, v_BTNK: Array) -> LayerCache:
        """Stores this call's keys and values (after RoPE) from slot ``index`` on."""
        return self._replace(keys=self._written(self.keys, k_BTNK), values=self._written(self.values, v_BTNK))


class KVCache(NamedTuple):
    """Keys and values of every layer plus per-row position bookkeeping (a pytree).

    Attributes:
        keys / values: one ``[B, S, N, K]`` array per layer, or (for layers stored stacked, decoded as one
            scan) one ``[L, B, S, N, K]`` array.
        positions_BS: int32 RoPE position of the token in each slot; -1 for padding or empty.
        lengths_B: int32 count of real tokens per row, hence the position of its next token.
        index: int32 scalar, the next slot to write (the same for every row).
    """

    keys: tuple[Array, ...] | Array
    values: tuple[Array, ...] | Array
    positions_BS: Array
    lengths_B: Array
    index: Array

    @property
    def stacked(self) -> bool:
        return not isinstance(self.keys, tuple)

    def layer(self, i: int | Array) -> LayerCache:
        """Layer ``i``'s cache: its own arrays, or (stacked) the stack and the index of its slice."""
        if self.stacked:
            return LayerCache(self.keys, self.values, self.index, jnp.asarray(i, jnp.int32))
        return LayerCache(self.keys[i], self.values[i], self.index)


def init_cache(
    num_layers: int, batch: int, max_length: int, kv_heads: int, head_dim: int, dtype: jnp.dtype | type,
    stacked: bool = False,
) -> KVCache:
    """An empty cache of ``max_length`` slots per row; it must hold the prompt and every new token.
    ``stacked``: one ``[L, ...]`` array for keys and one for values, for layers decoded as one scan."""
    if stacked:
        keys = values = jnp.zeros((num_layers, batch, max_length, kv_heads, head_dim), dtype)
    else:
        keys = values = (jnp.zeros((batch, max_length, kv_heads, head_dim), dtype),) * num_layers
    return KVCache(
        keys=keys,
        values=values,
        positions_BS=jnp.full((batch, max_length), -1, jnp.int32),
        lengths_B=jnp.zeros((batch,), jnp.int32),
        index=jnp.zeros((), jnp.int32),
    )


def check_room(cache: KVCache, new: int) -> None:
    """Refuses ``new`` tokens that do not fit in the cache's slots, where the write index is known (eager
    decoding): the write would be clamped to end at the last slot, overwriting earlier keys and values silently.
    Inside a compiled program the index is traced and cannot be checked (``generate`` sizes its own cache)."""
    index = cache.index
    if isinstance(index, jax.core.Tracer) or not getattr(index, "is_fully_addressable", True):
        return
    slots, written = cache.positions_BS.shape[1], int(index)
    if written + new > slots:
        raise CacheOverflowError(
            f"the key/value cache holds {slots} slots, {written} of them written: {new} more token(s) do not fit "
            "(the write would overwrite the last slots). Make it with model.init_cache(batch, max_length) and "
            f"max_length >= prompt length + tokens to decode (here at least {written + new}).")


def advance(cache: KVCache, attention_mask_BT: Array) -> tuple[Array, KVCache]:
    """Positions of ``T`` new tokens, and the cache's bookkeeping with them appended.

    Real tokens continue each row's count (so left, right or no padding give the same positions);
    padding gets -1. Keys and values are left to the layers, which write at the old ``index``.
    Raises ``CacheOverflowError`` (eagerly, see ``check_room``) if they do not fit.
    """
    check_room(cache, attention_mask_BT.shape[1])
    real_BT = attention_mask_BT != 0
    counts_BT = jnp.cumsum(real_BT, axis=1, dtype=jnp.int32)
    positions_BT = jnp.where(real_BT, cache.lengths_B[:, None] + counts_BT - 1, -1)
    positions_BS = jax.lax.dynamic_update_slice_in_dim(cache.positions_BS, positions_BT, cache.index, axis=1)
    return positions_BT, cache._replace(
        positions_BS=positions_BS,
        lengths_B=cache.lengths_B + counts_BT[:, -1],
        index=cache.index + attention_mask_BT.shape[1],
    )


def with_layers(cache: KVCache, layers: list[LayerCache]) -> KVCache:
    """The cache holding the keys and values the layers wrote (each its own arrays)."""
    return cache._replace(keys=tuple(l.keys for l in layers), values=tuple(l.values for l in layers))

