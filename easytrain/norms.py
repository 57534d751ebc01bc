"""The global L2 norm of a pytree (the gradient norm every train step takes), cheap to compile on XLA:CPU, and the
staged sums it is made of (`split_for_sum`, `sum_in_stages`; checkpoint digests sum the same way).

XLA:CPU rewrites every sum over an axis longer than 32 into a tree of `reduce-window` kernels, one kernel per
level, for accuracy: with the YNNPACK fusions off (`compiler_options='auto'` on AMD CPUs) the norm of the
benchmark Llama's 39 gradients was 172 kernels and 0.21 s of compile. A sum whose reduced axes are all at most
32 long is left alone and runs as one vectorised loop. So on CPU each leaf is viewed with every axis split into
factors of at most 32 (a free reshape) and summed in stages of at most `_BLOCK` elements per partial sum: two
kernels for a leaf of a million elements, 37 kernels and 0.12 s for the 39 gradients, as accurate as the tree
(one pass over a million float32 squares is off by about 1e-5). `optimization_barrier` keeps XLA's simplifier
from folding the split, and the stages, back together before that rewrite runs; it moves no data. An axis
splits into its own factors, its power of two first, so one sharded over 2, 4, 8, ... devices splits at shard
boundaries and keeps its sharding (partial sums per shard, then all-reduces). An odd factor above 32 stays
whole and that leaf's last stage is summed the usual way. Where the devices in play are not a power of two of at
most 32, a shard count could cut across the view's factors, so the norm sums each leaf as it is. On one device
the squares of all leaves of one size are added elementwise into one staged sum (four sizes among the 39
gradients). Other platforms sum each leaf's squares in one reduction, as optax does.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from easytrain.sharding import devices_in_play, on_one_cpu_device

#: XLA:CPU's tree-reduction window: sums over a longer axis become `reduce-window` trees.
_WINDOW = 32
#: Elements summed into one partial sum per stage (two stages for a million elements).
_BLOCK = 1024


def global_norm(tree: Any) -> jax.Array:
    """The L2 norm of all leaves together, accumulated in float32; summed in stages only where that view keeps
    every shard whole (`_views_keep_shards`), each leaf's squares in one reduction otherwise. On one CPU device
    the squares of leaves of one size are added elementwise inside one staged sum (`_same_size_squares`)."""
    leaves = [jnp.asarray(leaf) for leaf in jax.tree.leaves(tree)]
    if not _views_keep_shards():
        squares = [jnp.sum(jnp.square(leaf.astype(jnp.float32))) for leaf in leaves]
    elif on_one_cpu_device():
        squares = [sum_in_stages(values) for values in _same_size_squares(leaves)]
    else:
        squares = [sum_in_stages(jnp.square(split_for_sum(leaf).astype(jnp.float32))) for leaf in leaves]
    return jnp.sqrt(sum(squares, jnp.zeros((), jnp.float32)))


def _same_size_squares(leaves: list[jax.Array]) -> list[jax.Array]:
    """Per leaf size, the float32 squares of every leaf of that size added elementwise, each leaf viewed flat.

    A model's gradients are a few sizes many times over (each layer's projections): one staged sum per size is
    two kernels for XLA:CPU to compile where one per leaf was two per leaf (the benchmark Llama's train step 523
    -> 488 kernels, 0.15 s less compile). The additions fuse into the first stage, so each gradient is still read
    once. Only on one device: leaves of one size may be sharded differently, and adding them would move shards.
    """
    by_size: dict[int, jax.Array] = {}
    for leaf in leaves:  # `lax` ops: each `jnp` call costs several times as much to trace, for the same program
        squared = jax.lax.square(jax.lax.convert_element_type(_view(leaf, _split_axis(leaf.size)), jnp.float32))
        by_size[leaf.size] = jax.lax.add(by_size[leaf.size], squared) if leaf.size in by_size else squared
    return list(by_size.values())


def _views_keep_shards() -> bool:
    """Whether `split_for_sum`'s view keeps every shard whole however a leaf is sharded over the devices in play (the
    mesh in context, as the trainer traces its step, else every device): true for a power of two of at most
    `_WINDOW` devices, since an axis's leading factor is then a multiple of any shard count that divides the axis.
    Over three devices, 96 rows viewed as 32 x 3 would cut across shards of 32 rows and gather them."""
    devices = devices_in_play()
    return devices & (devices - 1) == 0 and devices <= _WINDOW


def split_for_sum(leaf: jax.Array) -> jax.Array:
    """On CPU, `leaf` viewed with every axis split into factors of at most `_WINDOW`, behind an `optimization_barrier`
    so that XLA's simplifier does not fold the split back (no data moves); elsewhere `leaf` itself. Elementwise work
    on the result fuses into the first stage of `sum_in_stages`."""
    leaf = jnp.asarray(leaf)
    if jax.default_backend() != "cpu":
        return leaf
    return _view(leaf, [factor for size in leaf.shape for factor in _split_axis(size)])


def _view(leaf: jax.Array, shape: list[int]) -> jax.Array:
    """`leaf` reshaped to `shape` behind an `optimization_barrier` (CPU only)."""
    return jax.lax.optimization_barrier(jax.lax.reshape(leaf, tuple(shape)))


def sums_in_place(shape: tuple[int, ...]) -> bool:
    """Whether every axis of `shape` splits into factors of at most `_WINDOW`: then no stage of `sum_in_stages` is
    rewritten into `reduce-window` kernels on CPU, and the first reads its operand in place, with no scratch."""
    return all(factor <= _WINDOW for size in shape for factor in _split_axis(size))


def splits_at_shards(shape: tuple[int, ...], shard_shape: tuple[int, ...]) -> bool:
    """Whether `split_for_sum`'s view of an array of `shape` in shards of `shard_shape` keeps every shard whole: each
    axis's leading factor is a multiple of its shard count (an axis over 2, 4, 8, ... devices, not over 3), so the
    view moves no data between devices."""
    return all(size % shard == 0 and _split_axis(size)[0] % (size // shard) == 0
               for size, shard in zip(shape, shard_shape) if size)


def sum_in_stages(values: jax.Array) -> jax.Array:
    """The sum of every element of `values` (from `split_for_sum`, with elementwise work on it): on CPU a chain of
    reductions over trailing axes of at most `_BLOCK` elements together, each kept apart by a barrier; elsewhere one
    reduction. In `values`' own dtype (exact, wrapping, for unsigned integers)."""
    if jax.default_backend() != "cpu":
        return jnp.sum(values, dtype=values.dtype)
    while values.ndim:
        reduced, block = 1, values.shape[-1]
        while reduced < values.ndim and block * values.shape[-1 - reduced] <= _BLOCK:
            block *= values.shape[-1 - reduced]
            reduced += 1
        # `lax.reduce` of an addition from zero is `jnp.sum`'s own reduction, without its per-call trace
        values = jax.lax.reduce(values, np.zeros((), values.dtype), jax.lax.add,
                                tuple(range(values.ndim - reduced, values.ndim)))
        if values.ndim:
            values = jax.lax.optimization_barrier(values)
    return values


def _split_axis(size: int) -> list[int]:
    """`size` as factors of at most `_WINDOW`: its power of two first, in factors of 32 (so an axis sharded over a
    power of two of devices splits at shard boundaries), then its odd part, largest factors first; a remainder
    with no factor up to 32 stays whole (`4096 -> [32, 32, 4]`, `1000 -> [8, 25, 5]`, `50257 -> [29, 1733]`)."""
    if size == 0:
        return [0]
    twos = (size & -size).bit_length() - 1  # the exponent of the power of two dividing size
    window_twos = _WINDOW.bit_length() - 1
    factors = [_WINDOW] * (twos // window_twos) + ([2 ** (twos % window_twos)] if twos % window_twos else [])
    size >>= twos
    while size > 1:
        factor = next((f for f in range(_WINDOW, 1, -1) if size % f == 0), size)
        factors.append(factor)
        size //= factor
    return factors or [1]
