"""Content fingerprints of a train state, so a corrupted checkpoint fails loudly instead of loading garbage.

Orbax's array files carry no checksum over the data itself: a flipped or overwritten byte restores as
a wrong number (often a NaN several steps later). Each checkpoint therefore stores two 32-bit digests
per leaf, computed on device when it is saved and checked when it is restored (a leaf of at most `SMALL_ON_HOST`
elements that this process holds whole in NumPy, to the same values: no digest compiled for it).

The digests are wrapping sums over the raw bits, so they are exact and independent of how the array
is sharded: a checkpoint restored onto another mesh or process count checks against the same values.
They are reduced in each array's own shape and sharding (never flattened), so every device sums only
its shard and no weight is gathered, however large the model. On XLA:CPU the sums run in stages over axes of
at most 32 (`easytrain.norms.sum_in_stages`), which read the array in place: an array whose axes all split
into such factors is summed in one pass, with no scratch. Any other large array is summed in blocks along
the leading axes its devices hold whole (a stacked weight a layer at a time), so the scratch is a block's.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from easytrain.errors import EasytrainError
from easytrain.listing import listed
from easytrain.norms import split_for_sum, splits_at_shards, sum_in_stages, sums_in_place

_UNSIGNED = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32}
_GOLDEN = np.uint32(2654435761)  # Knuth's multiplicative hash: position-weighted sum catches moved data
_BLOCK_ELEMENTS = 2**20  # 4 MiB of uint32 bits: summed in cache on XLA:CPU (`_digest_from`)
#: `host_elements` of the fingerprints a run takes (its saves, restores and once-per-run records): a leaf this small
#: (256 KiB of float32 at most) is fetched and digested in NumPy in well under the time its digest takes to compile
#: (tens of milliseconds per shape, at every run's first save and first restore), and in about the time the compiled
#: digest takes to launch and be fetched (XLA:CPU: 18 us against 34 us at 64 elements, 185 against 200 at 2**16).
SMALL_ON_HOST = 2**16
_HOST_GROUP = 256  # leaves copied to the host at once: 64 MiB at most of `SMALL_ON_HOST`-element float32 leaves


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


def _digestible(leaf: jax.Array) -> jax.Array:
    """`leaf` as an array of a 1-, 2- or 4-byte type whose bits are digested: PRNG keys as their key data,
    bools as bytes (0 or 1, as NumPy stores them), 8-byte types as their float32/int32 view."""
    if jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key):
        leaf = jax.random.key_data(leaf)
    if leaf.dtype == jnp.bool_:  # bitcast refuses bool
        leaf = leaf.astype(jnp.uint8)
    if jnp.dtype(leaf.dtype).itemsize not in _UNSIGNED:  # compare a 32-bit view's digest instead of failing
        leaf = leaf.astype(jnp.float32 if jnp.issubdtype(leaf.dtype, jnp.floating) else jnp.int32)
    return leaf


def _block_digest(values: jax.Array, offset: jax.Array, in_place: bool) -> jax.Array:
    """`[sum(bits), sum(bits * weight(offset + position))]` mod 2**32 of one contiguous block of the array.

    Both are reductions over every axis of the unflattened block, so each device sums its own shard
    and only two scalars cross devices; no layout change is needed. `in_place` (XLA:CPU, shards that stay
    whole in the view) sums them in stages (`easytrain.norms.sum_in_stages`) whose first stage reads the block
    itself: a single sum writes the bits and the weighted bits out in full first. A row-major view keeps every
    element's flat position.
    """
    if in_place:
        values = split_for_sum(values)
    bits = jax.lax.bitcast_convert_type(values, _UNSIGNED[jnp.dtype(values.dtype).itemsize]).astype(jnp.uint32)
    weights = (_flat_positions(bits.shape) + offset) * _GOLDEN + jnp.uint32(1)
    total = sum_in_stages if in_place else functools.partial(jnp.sum, dtype=jnp.uint32)
    return jnp.stack([total(bits), total(bits * weights)])


def _digest_from(values: jax.Array, offset: jax.Array, whole_axes: int, block_elements: int,
                 in_place: bool) -> jax.Array:
    """The digest of `values`, whose first element sits at flat position `offset` of the whole array.

    XLA:CPU sums an axis longer than 32 through reduce-windows that do not fuse their operands: it writes
    the bits and the weighted bits out in full before reducing them, which runs at memory speed once they
    outgrow the cache (a `[16, 1024, 1024]` stacked weight digested 4x slower per byte than its 16 layers
    apart, when every sum went that way). So an array over `block_elements` that cannot be summed in place
    (`_digest_plan`) is summed in contiguous blocks along its leading axes that every
    device holds whole (`whole_axes` of them: never an axis split across devices, which would move data),
    one block per loop iteration; the sums are exact mod 2**32, so the digest is the same value.
    """
    if whole_axes == 0 or values.ndim == 0 or values.size <= block_elements:
        return _block_digest(values, offset, in_place)
    rows, row_size = values.shape[0], values.size // values.shape[0]
    count = next((k for k in range(1, rows) if rows % k == 0 and (rows // k) * row_size <= block_elements), rows)
    if count == rows:  # one row per block, digested in turn (blocked again along the next axis if still large)
        blocks, digest = values, functools.partial(_digest_from, whole_axes=whole_axes - 1,
                                                   block_elements=block_elements, in_place=in_place)
    else:
        blocks = values.reshape((count, rows // count) + values.shape[1:])
        digest = functools.partial(_block_digest, in_place=in_place)
    block_size = np.uint32((values.size // count) % 2**32)
    parts = jax.lax.map(lambda block: digest(block[1], offset + block[0] * block_size),
                        (jnp.arange(count, dtype=jnp.uint32), blocks))
    return jnp.sum(parts, axis=0, dtype=jnp.uint32)


@functools.partial(jax.jit, static_argnums=(1, 2, 3))
def _leaf_digest(leaf: jax.Array, whole_axes: int, block_elements: int, in_place: bool = False) -> jax.Array:
    """`[sum(bits), sum(bits * weight(position))]` mod 2**32 of one array's raw bits."""
    return _digest_from(_digestible(leaf), jnp.uint32(0), whole_axes, block_elements, in_place)


def _whole_leading_axes(leaf: jax.Array, block_elements: int) -> int:
    """How many leading axes of `leaf` every device holds in full (its shards split none of them); none
    when a device's shard is small enough to sum at once."""
    shard = leaf.sharding.shard_shape(leaf.shape)
    if np.prod(shard, dtype=np.int64) <= block_elements:
        return 0
    count = 0
    for size, held in zip(leaf.shape, shard):
        if size != held:
            break
        count += 1
    return count


def _digest_plan(leaf: jax.Array, block_elements: int = _BLOCK_ELEMENTS) -> tuple[int, int, bool]:
    """The static arguments of `_leaf_digest` for `leaf`: its whole leading axes, the block size and whether it is
    summed in place. On XLA:CPU it is, when its shards stay whole in `split_for_sum`'s view (else the view would
    move data between devices); then an array whose axes all split into factors of at most 32 is summed in one
    pass, with no scratch to bound (a `[16, 1024, 1024]` stacked weight in 8 ms, against 10-15 ms a layer at a
    time), and one with a larger odd factor a block at a time, since a stage sums that factor the usual way."""
    in_place = jax.default_backend() == "cpu" and splits_at_shards(leaf.shape, leaf.sharding.shard_shape(leaf.shape))
    if in_place and sums_in_place(leaf.shape):
        return 0, block_elements, True
    return _whole_leading_axes(leaf, block_elements), block_elements, in_place


def _digest(leaf: jax.Array, block_elements: int = _BLOCK_ELEMENTS) -> jax.Array:
    """The two digests of one array, on its devices, in its sharding (dispatched, not fetched)."""
    return _leaf_digest(leaf, *_digest_plan(leaf, block_elements))


# XLA:CPU deadlocks when over 32 programs wait per device (its in-flight limit) on a multi-device mesh: the
# launch blocking on that limit holds a thread of the pool that would run the waiting programs.
_IN_FLIGHT = 16


def _digests(tree: Any, host_elements: int = 0) -> list[np.ndarray]:
    """One compiled digest per leaf (one compilation per distinct shape, dtype and layout): the scratch
    memory is that of the largest leaf, never of the whole tree at once. Fetched `_IN_FLIGHT` leaves at a
    time, so a tree of many leaves never queues more programs than XLA:CPU can run on a mesh. Leaves that
    `_on_host(leaf, host_elements)` takes are digested in NumPy instead (`_host_digest`), to the same values."""
    leaves = jax.tree.leaves(tree)
    on_host = [_on_host(leaf, host_elements) for leaf in leaves]
    on_device = [leaf for leaf, host in zip(leaves, on_host) if not host]
    fetched = iter([value for start in range(0, len(on_device), _IN_FLIGHT)
                    for value in jax.device_get([_digest(leaf) for leaf in on_device[start:start + _IN_FLIGHT]])])
    # the host's leaves copied together, a group at a time (on a GPU, one blocking copy each would wait per leaf)
    to_host = [leaf for leaf, host in zip(leaves, on_host) if host]
    copied = iter([_host_digest(value) for start in range(0, len(to_host), _HOST_GROUP)
                   for value in jax.device_get(to_host[start:start + _HOST_GROUP])])
    return [next(copied) if host else next(fetched) for host in on_host]


def _on_host(leaf: Any, host_elements: int) -> bool:
    """Whether `leaf` is digested in NumPy: any leaf that is not a `jax.Array` (a NumPy array or scalar is on the
    host already), or one of at most `host_elements` elements, all held by this process, of a 1-, 2- or 4-byte type
    (or bool), so its bits are read as they are. Fetching such a leaf costs less than compiling its digest for a
    shape seen once; a larger or multi-process one is summed where it lies."""
    if not isinstance(leaf, jax.Array):
        return True
    return (leaf.size <= host_elements and leaf.is_fully_addressable
            and not jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key)
            and jnp.dtype(leaf.dtype).itemsize in _UNSIGNED)


def _host_digest(leaf: Any) -> np.ndarray:
    """`_leaf_digest`'s two values computed in NumPy: uint64 arithmetic wraps mod 2**64, a multiple of 2**32, so
    its sums taken mod 2**32 are the device's exactly (bools are bytes 0 or 1 in both; an 8-byte type is digested
    as its 32-bit view, as `_digestible` does)."""
    values = np.asarray(leaf)
    if values.dtype.itemsize not in _UNSIGNED:
        values = values.astype(np.float32 if np.issubdtype(values.dtype, np.floating) else np.int32)
    bits = values.view(_UNSIGNED[values.dtype.itemsize]).reshape(-1).astype(np.uint64)
    weights = np.arange(bits.size, dtype=np.uint64) * np.uint64(_GOLDEN) + np.uint64(1)
    return (np.stack([bits.sum(dtype=np.uint64), (bits * weights).sum(dtype=np.uint64)]) % np.uint64(2**32)
            ).astype(np.uint32)


def _bits(dtype: Any) -> int | None:
    """Bits per element of an integer or float dtype (4 for int4 and float4, which NumPy stores a byte each)."""
    if jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key):
        return None
    dtype = jnp.dtype(dtype)
    if jnp.issubdtype(dtype, jnp.integer):
        return jnp.iinfo(dtype).bits
    return jnp.finfo(dtype).bits if jnp.issubdtype(dtype, jnp.floating) else None


def _refuse_sub_byte(paths: list[str], leaves: list[Any]) -> None:
    """Refuse sub-byte types by name before any digest: XLA cannot view their bits as bytes, and NumPy's byte per
    element would digest a small one on the host where a large or multi-process one fails on the device."""
    for path, leaf in zip(paths, leaves):
        if (bits := _bits(getattr(leaf, "dtype", np.float32))) is not None and bits < 8:
            raise ValueError(f"{path!r} is {jnp.dtype(leaf.dtype).name} ({bits} bits per element), which cannot be "
                             "digested: a checkpoint or fingerprint needs whole-byte types. Keep quantised values "
                             "as int8/uint8 (or unpacked) in the state, or leave them out of what is fingerprinted.")


def fingerprint(tree: Any, host_elements: int = 0) -> dict[str, list[int]]:
    """Dotted leaf path -> two uint32 digests; JSON-ready. Leaves of at most `host_elements` elements that this
    process holds whole are digested on the host (`_on_host`), to the same values."""
    flat = jax.tree_util.tree_flatten_with_path(tree)[0]
    paths = [jax.tree_util.keystr(path, simple=True, separator=".") for path, _ in flat]
    _refuse_sub_byte(paths, [leaf for _, leaf in flat])
    values = _digests(tree, host_elements)
    return {path: [int(v) for v in np.asarray(value)] for path, value in zip(paths, values)}


def combined_digest(parts: list[list[int]], part_elements: int) -> list[int]:
    """The digest of the arrays whose digests are `parts`, stacked along a new leading axis in that order (each of
    `part_elements` digested elements): a position's weight `p * _GOLDEN + 1` is linear in `p`, so part `i`'s
    weighted sum moves by `i * part_elements * _GOLDEN` times its plain sum. Lets a digest recorded of a stacked
    weight be compared with one taken layer by layer, without reading any layer again."""
    golden, total, weighted = int(_GOLDEN), 0, 0
    for index, (plain, positional) in enumerate(parts):
        total += plain
        weighted += positional + index * part_elements * golden * plain
    return [total % 2**32, weighted % 2**32]


def verify(tree: Any, expected: dict[str, list[int]], where: str) -> None:
    """Raise `CorruptCheckpointError` naming every leaf whose digest differs from the saved one, or that the saved
    fingerprint records no digest for (an emptied or edited fingerprint would otherwise check nothing). Small leaves
    are digested on the host (`SMALL_ON_HOST`), to the same values."""
    actual = fingerprint(tree, SMALL_ON_HOST)
    if unrecorded := sorted(actual.keys() - expected.keys()):
        raise CorruptCheckpointError(f"{where}: its fingerprint records no digest for {len(unrecorded)} restored "
                                     f"array(s) ({listed(unrecorded, 8)}); the fingerprint file is damaged.")
    damaged = sorted(path for path, digest in expected.items() if actual.get(path, digest) != digest)
    if damaged:
        raise CorruptCheckpointError(f"{where}: the restored values of {len(damaged)} array(s) differ from what "
                                     f"was saved ({listed(damaged, 8)}); the checkpoint files are damaged.")
