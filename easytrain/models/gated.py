"""The MLP's gated activation `act(gate) * up`, with a hand-written backward pass for SwiGLU.

Differentiated as written, `silu(gate) * up` leaves six `[M, F]` arrays per layer for the backward pass (the
sigmoid and the silu among them), each written out by a kernel of its own on XLA:CPU. `swiglu` keeps only its
inputs, the gate and up projections' outputs, and recomputes the sigmoid inside its two gradient kernels:
three `[M, F]` arrays per layer instead of six, and three elementwise passes instead of five. The benchmark
Llama's train step runs about 2% faster on XLA:CPU (docs/benchmarks.md); the values are the same and the
gradients agree to rounding.
"""

from __future__ import annotations

from typing import Callable

import jax

from easytrain.models.families import ACTIVATIONS

Array = jax.Array


@jax.custom_vjp
def swiglu(gate: Array, up: Array) -> Array:
    """`silu(gate) * up`, in the inputs' dtype."""
    return gate * jax.nn.sigmoid(gate) * up


def _swiglu_forward(gate: Array, up: Array) -> tuple[Array, tuple[Array, Array]]:
    return swiglu(gate, up), (gate, up)


def _swiglu_backward(residuals: tuple[Array, Array], grad_out: Array) -> tuple[Array, Array]:
    """d/dgate `silu(g) u` = `u s (1 + g (1 - s))` with `s = sigmoid(g)`; d/dup = `silu(g)`."""
    gate, up = residuals
    sig = jax.nn.sigmoid(gate)
    return grad_out * up * sig * (1 + gate * (1 - sig)), grad_out * gate * sig


swiglu.defvjp(_swiglu_forward, _swiglu_backward)


def gated_activation(name: str) -> Callable[[Array, Array], Array]:
    """`(gate, up) -> act(gate) * up` for the activation `name` (a key of `families.ACTIVATIONS`)."""
    if name == "silu":
        return swiglu
    activation = ACTIVATIONS[name]
    return lambda gate, up: activation(gate) * up
