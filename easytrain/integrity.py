"""Content fingerprints of a train state, so a corrupted checkpoint fails loudly instead of loading garbage.

Orbax's array files carry no checksum over the data itself: a flipped or overwritten byte restores as
a wrong number (often a NaN several steps later). Each checkpoint therefore stores two 32-bit digests
per leaf, computed on device when it is saved and checked when it is restored.

The digests are wrapping sums over the raw bits, so they are exact and independent of how the array
is sharded: a checkpoint restored onto another mesh or process count checks against the same values.
They are reduced in each array's own shape and sharding (never flattened), so every device sums only
its shard and no weight is gathered, however large the model.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from easytrain.errors import EasytrainError

_UNSIGNED = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32}
_GOLDEN = np.uint32(2654435761)  # Knuth's multiplicative hash: position-weighted sum catches moved data


class CorruptCheckpointError(EasytrainError, ValueError):
    """Restored arrays differ from what was saved (damaged or tampered files)."""


def _flat_positions(shape: tuple[int, ...]) -> jax.Array:
    """Row-major flat index (mod 2**32) of every element, laid out in `shape` itself.

    Built from per-dimension iotas instead of `ravel()`: flattening a tensor-sharded array makes XLA
    all-gather it (a full replica of every weight per device at each save and restore), while an iota
    in the array's own shape is partitioned like the array: each device makes its own shard's positions
    inside the multiply's fusion. Wrapping uint32 arithmetic is exact mod 2**32, so the value equals
    `arange(size)` of the flattened array and checkpoints saved by the flattening version still verify.
    """
    position = jnp.zeros(shape, jnp.uint32)
    stride = 1
    for axis in reversed(range(len(shape))):
        position = position + jax.lax.broadcasted_iota(jnp.uint32, shape, axis) * np.uint32(stride % 2**32)
        stride *= shape[axis]
    return position


def _leaf_digest(leaf: jax.Array) -> jax.Array:
    """`[sum(bits), sum(bits * weight(position))]` mod 2**32 of one array's raw bits.

    Both are reductions over every axis of the unflattened array, so each device sums its own shard
    and only two scalars cross devices; no layout change is needed.
    """
    if jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key):
        leaf = jax.random.key_data(leaf)
    if leaf.dtype == jnp.bool_:  # bitcast refuses bool; its byte is 0 or 1, as NumPy stores it
        leaf = leaf.astype(jnp.uint8)
    unsigned = _UNSIGNED.get(jnp.dtype(leaf.dtype).itemsize)
    if unsigned is None:  # 8-byte types: compare a float32/int32 view's digest instead of failing
        leaf = leaf.astype(jnp.float32 if jnp.issubdtype(leaf.dtype, jnp.floating) else jnp.int32)
        unsigned = jnp.uint32
    bits = jax.lax.bitcast_convert_type(leaf, unsigned).astype(jnp.uint32)
    weights = _flat_positions(bits.shape) * _GOLDEN + jnp.uint32(1)
    return jnp.stack([jnp.sum(bits, dtype=jnp.uint32), jnp.sum(bits * weights, dtype=jnp.uint32)])


_digest = jax.jit(_leaf_digest)

# XLA:CPU deadlocks when over 32 programs wait per device (its in-flight limit) on a multi-device mesh: the
# launch blocking on that limit holds a thread of the pool that would run the waiting programs.
_IN_FLIGHT = 16


def _digests(tree: Any) -> list[np.ndarray]:
    """One compiled digest per leaf (one compilation per distinct shape, dtype and layout): the scratch
    memory is that of the largest leaf, never of the whole tree at once. Fetched `_IN_FLIGHT` leaves at a
    time, so a tree of many leaves never queues more programs than XLA:CPU can run on a mesh."""
    leaves = jax.tree.leaves(tree)
    return [value for start in range(0, len(leaves), _IN_FLIGHT)
            for value in jax.device_get([_digest(leaf) for leaf in leaves[start:start + _IN_FLIGHT]])]


def fingerprint(tree: Any) -> dict[str, list[int]]:
    """Dotted leaf path -> two uint32 digests; JSON-ready."""
    paths = [jax.tree_util.keystr(path, simple=True, separator=".")
             for path, _ in jax.tree_util.tree_flatten_with_path(tree)[0]]
    values = _digests(tree)
    return {path: [int(v) for v in np.asarray(value)] for path, value in zip(paths, values)}


def verify(tree: Any, expected: dict[str, list[int]], where: str) -> None:
    """Raise `CorruptCheckpointError` naming every leaf whose digest differs from the saved one."""
    actual = fingerprint(tree)
    damaged = sorted(path for path, digest in expected.items() if actual.get(path, digest) != digest)
    if damaged:
        shown = ", ".join(damaged[:8]) + (f", ... ({len(damaged) - 8} more)" if len(damaged) > 8 else "")
        raise CorruptCheckpointError(f"{where}: the restored values of {len(damaged)} array(s) differ from what "
                                     f"was saved ({shown}); the checkpoint files are damaged.")
