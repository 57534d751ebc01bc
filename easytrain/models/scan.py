"""Decoder layers as one `jax.lax.scan`: the loop body is traced and compiled once, whatever the depth.

The layers stay separate modules (`layers.0.self_attn.q_proj.kernel`, ...), so every per-layer path
(Hugging Face import/export, LoRA targets, sharding rules, checkpoints) is unchanged. Only while tracing
are their variables stacked along a new leading axis `L`, which the scan slices one layer per iteration;
the stack's transpose hands each layer its own gradient. Stacking copies the layer weights once per
forward pass (its cost is measured by `benchmarks/scan.py`). Each stacked weight is pinned to its
parameter's layout with an unsplit leading axis, so under FSDP the loop gathers one layer at a time.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from easytrain.errors import EasytrainError
from easytrain.models.remat import checkpointed
from easytrain.sharding import constrain

Array = jax.Array


class ScanLayersError(EasytrainError, ValueError):
    """`scan_layers` needs layers that are built alike (one module structure, same variable shapes)."""


def _layout(layer: nnx.Module) -> dict[tuple, tuple[str, tuple[int, ...], Any]]:
    """Variable path -> (kind, shape, dtype): what a stacked layer must agree on, in words for errors."""
    return {path: (type(var).__name__, tuple(var.shape), var.get_value().dtype)
            for path, var in nnx.to_flat_state(nnx.state(layer))}


def check_uniform(layers: Sequence[nnx.Module]) -> None:
    """Raises `ScanLayersError` naming the first layer built unlike layer 0, and how it differs."""
    first_graphdef, first_layout = nnx.graphdef(layers[0]), _layout(layers[0])
    for index, layer in enumerate(layers[1:], start=1):
        layout = _layout(layer)
        if layout == first_layout and nnx.graphdef(layer) == first_graphdef:
            continue
        paths = set(layout) | set(first_layout)
        differ = sorted("/".join(map(str, p)) for p in paths if layout.get(p) != first_layout.get(p))
        what = f"variables {differ[:4]} differ" if differ else "static attributes differ"
        raise ScanLayersError(
            f"scan_layers: layer {index} is built unlike layer 0 ({what}); a scan runs one layer structure. "
            "Set scan_layers=False, or make the layers alike (e.g. LoRA target_modules that match in every layer).")


def _stacked(*variables: nnx.Variable) -> nnx.Variable:
    """One variable of the layers' values along a new leading axis, each layer split as its parameter is."""
    axes = variables[0].get_metadata().get("out_sharding")

    def stack(*values: Array) -> Array:
        value_LX = jnp.stack(values)
        return constrain(value_LX, (None, *axes)) if axes else value_LX

    return jax.tree.map(stack, *variables)


def stack_layers(layers: Sequence[nnx.Module]) -> tuple[nnx.GraphDef, nnx.State, nnx.State]:
    """The layers' shared graph definition, their stacked parameters and their other stacked variables."""
    check_uniform(layers)
    splits = [nnx.split(layer, nnx.Param, ...) for layer in layers]
    is_variable = lambda x: isinstance(x, nnx.Variable)  # noqa: E731
    params = jax.tree.map(_stacked, *(p for _, p, _ in splits), is_leaf=is_variable)
    rest = jax.tree.map(_stacked, *(r for _, _, r in splits), is_leaf=is_variable)
    return splits[0][0], params, rest


def scan_layers(layers: Sequence[nnx.Module], carry: Any, fn: Callable[[nnx.Module, Any, Any], Any],
                xs: Any = None, *, policy: str = "none") -> Any:
    """`for layer, x in zip(layers, xs): carry = fn(layer, carry, x)`, as one `jax.lax.scan`.

    `xs` holds per-layer inputs along a leading axis (None: none). The body runs under the remat `policy`
    (`easytrain.models.remat.POLICIES`). Variables a layer changes in place (RNG stream counts of LoRA
    dropout) are written back to each layer, as the unrolled loop would leave them.
    """
    graphdef, params, rest = stack_layers(layers)

    def body(carry: Any, sliced: tuple[nnx.State, nnx.State, Any]) -> tuple[Any, nnx.State]:
        layer_params, layer_rest, x = sliced
        layer = nnx.merge(graphdef, layer_params, layer_rest)
        return fn(layer, carry, x), nnx.state(layer, nnx.Not(nnx.Param))

    carry, new_rest = jax.lax.scan(checkpointed(body, policy), carry, (params, rest, xs))
    for index, layer in enumerate(layers):
        nnx.update(layer, jax.tree.map(lambda value: value[index], new_rest))
    return carry
