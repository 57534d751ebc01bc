"""Row maxima for the shifts of a step's softmax and log-sum-exp, as XLA:CPU runs them fast.

XLA:CPU emits a float `max` that returns NaN whenever an operand is NaN, and it does not vectorise that
reduction: over a `[2048, 4096]` float32 array `jnp.max` took 3.6 ms against 1.1 ms for a sum. A reduction by
`where(a > b, a, b)` vectorises and took 0.9 ms (`benchmarks/maxima.py`; the train step about 1% faster). The
two agree on every array without NaN (a subnormal maximum comes back as it is where `max` flushes it to zero,
and XLA:CPU's arithmetic reads both as zero); with a NaN, the select may pass it over. Every maximum here is the
shift of an `exp` over the same row, so a NaN in the row still reaches the result through that `exp`, and a
non-finite loss is still seen as one. Other platforms keep `jnp.max` (XLA:GPU recognises a softmax by its `max`),
and so does a CPU program over several devices: a reduction over an axis split across them ends in an all-reduce
with the reduction's own computation, and XLA:CPU's all-reduce takes only the standard ones (sum, max, ...).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from easytrain.sharding import on_one_cpu_device

Array = jax.Array


def shift_max(x: Array, axis: int = -1, keepdims: bool = False) -> Array:
    """The largest element of `x` along `axis` (float dtypes), with no gradient: it is for shifting a softmax
    or log-sum-exp, whose value does not depend on the shift. -inf for a row of -inf."""
    x = jax.lax.stop_gradient(x)
    if not on_one_cpu_device():
        return jnp.max(x, axis=axis, keepdims=keepdims)
    axis = axis % x.ndim
    largest = jax.lax.reduce(x, jnp.array(-jnp.inf, x.dtype), _larger, (axis,))
    return jnp.expand_dims(largest, axis) if keepdims else largest


def _larger(a: Array, b: Array) -> Array:
    return jnp.where(a > b, a, b)


@functools.partial(jax.custom_jvp, nondiff_argnums=(1,))
def softmax(x: Array, axis: int = -1) -> Array:
    """`jax.nn.softmax(x, axis)`, shifted by `shift_max`, with the same derivative rule."""
    unnormalized = jnp.exp(x - shift_max(x, axis, keepdims=True))
    return unnormalized / jnp.sum(unnormalized, axis, keepdims=True)


@softmax.defjvp
def _softmax_jvp(axis: int, primals: tuple[Array], tangents: tuple[Array]) -> tuple[Array, Array]:
    (x,), (x_dot,) = primals, tangents
    y = softmax(x, axis)
    return y, y * (x_dot - jnp.sum(y * x_dot, axis, keepdims=True))
