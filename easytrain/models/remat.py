"""Rematerialisation of decoder layers: recompute activations in the backward pass instead of keeping them.

`"full"` keeps only each layer's input (the least memory, one more forward pass of compute); `"dots"`
keeps the matmul outputs without batch dimensions and recomputes the cheap elementwise work in between
(`jax.checkpoint_policies.dots_with_no_batch_dims_saveable`); `"none"` keeps everything (the fastest when
it fits). The values and gradients are the same either way.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
from flax import nnx

POLICIES: dict[str, Any] = {"none": None, "full": jax.checkpoint_policies.nothing_saveable,
                            "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable}


def _check(policy: str) -> None:
    if policy not in POLICIES:
        raise ValueError(f"remat policy must be one of {', '.join(POLICIES)}, got {policy!r}")


def _call(layer: nnx.Module, *args: Any) -> Any:
    return layer(*args)


def layer_runner(policy: str) -> Callable[..., Any]:
    """`run(layer, *args) = layer(*args)`, rematerialised under `policy` (one of `POLICIES`)."""
    _check(policy)
    return _call if policy == "none" else nnx.remat(_call, policy=POLICIES[policy])


def checkpointed(fn: Callable[..., Any], policy: str) -> Callable[..., Any]:
    """A pure `fn` (e.g. a `lax.scan` body) rematerialised under `policy` (one of `POLICIES`).

    `prevent_cse=False`, as JAX advises inside `scan`: the loop already keeps the recomputation apart.
    """
    _check(policy)
    return fn if policy == "none" else jax.checkpoint(fn, policy=POLICIES[policy], prevent_cse=False)
