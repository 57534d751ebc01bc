"""A dense layer's product `x @ w`, with its weight gradient in the form XLA:CPU runs fastest.

Over M tokens, the weight gradient of `y = x @ w` is `x^T @ g`: a product contracted over the tokens, the leading
axis of both operands. JAX's transpose rule of a dot gives it in that form, and XLA:CPU hands it to Eigen with the
left operand read transposed. Where the kernel has more inputs than outputs (an MLP's down projection, `[1024, 256]`
in the benchmark Llama) that product ran about 1.26-1.29x faster with `x^T` written out first; the transpose that
costs is then smaller than what it saves. On the other shapes the gain was 2-11% for the product alone, and less
than that once their transposes are added: the trainer's step gained less with every dense layer in this form
(paired medians 1.011 and 1.034) than with the down projections alone (1.040 and 1.064;
`benchmarks/weight_gradients.py`). XLA folds a plain transpose back into the dot, so the tangent rule names `x^T`
behind an `optimization_barrier`, and reverse mode computes `barrier(x^T) @ g`. The forward product and the input
gradient `g @ w^T` are as JAX writes them.

It is a `jax.custom_jvp`, so forward mode (`jax.jvp`, `jax.hessian`) works through it. Tangents that are zero
(a frozen weight under LoRA, an input that is not differentiated) stay symbolic: no product is computed for them.
One CPU device only (`easytrain.sharding.on_one_cpu_device`), where it was measured; elsewhere XLA picks the
layouts (and the barrier would keep XLA:GPU from fusing the transpose into the product). While `jnp.dot` or
`lax.dot_general` is intercepted (qwix's LoRA and quantisation), the product is called as written.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.custom_derivatives import SymbolicZero

from easytrain.sharding import on_one_cpu_device

Array = jax.Array
DType = jnp.dtype | type | None
#: `dot_general` dimensions of `x^T @ dw` with `x^T` as `[I, M]` and `dw` as `[I, O]`: contract I, give `[M, O]`.
_TRANSPOSED_LHS = (((0,), (0,)), ((), ()))
#: The products as JAX defines them. An interceptor (qwix's LoRA and quantisation providers) replaces them while a
#: model runs and creates its parameters inside them: it must see the product called as written, in the module's
#: own trace (inside a custom rule flax refuses to create them), and its weight is frozen or quantised anyway.
_AS_DEFINED = (jnp.dot, jax.lax.dot_general)


def dense_product(x_MI: Array, w_IO: Array, out_dtype: DType = None) -> Array:
    """`jnp.dot(x_MI, w_IO, preferred_element_type=out_dtype)` for 2-D `x_MI`; on one CPU device, for a kernel
    with more inputs than outputs, with the weight gradient computed from `x^T` written out."""
    inputs, outputs = w_IO.shape
    if inputs <= outputs or (jnp.dot, jax.lax.dot_general) != _AS_DEFINED or not on_one_cpu_device():
        return jnp.dot(x_MI, w_IO, preferred_element_type=out_dtype)
    return _transposed_weight_gradient(x_MI, w_IO, out_dtype)


@functools.partial(jax.custom_jvp, nondiff_argnums=(2,))
def _transposed_weight_gradient(x_MI: Array, w_IO: Array, out_dtype: DType) -> Array:
    return jnp.dot(x_MI, w_IO, preferred_element_type=out_dtype)


def _jvp(out_dtype: DType, primals: tuple[Array, Array], tangents: tuple[Array, Array]) -> tuple[Array, Array]:
    (x_MI, w_IO), (dx_MI, dw_IO) = primals, tangents
    y_MO = _transposed_weight_gradient(x_MI, w_IO, out_dtype)
    parts = []
    if not isinstance(dx_MI, SymbolicZero):
        parts.append(jnp.dot(dx_MI, w_IO, preferred_element_type=out_dtype))
    if not isinstance(dw_IO, SymbolicZero):
        # `x @ dw` written as `(x^T)^T @ dw`: its transpose for reverse mode is then `x^T @ g`, with x^T a
        # residual that the barrier keeps written out.
        x_IM = jax.lax.optimization_barrier(x_MI.T)
        parts.append(jax.lax.dot_general(x_IM, dw_IO, _TRANSPOSED_LHS, preferred_element_type=out_dtype))
    if not parts:
        return y_MO, jnp.zeros_like(y_MO)
    return y_MO, parts[0] if len(parts) == 1 else parts[0] + parts[1]


_transposed_weight_gradient.defjvp(_jvp, symbolic_zeros=True)
