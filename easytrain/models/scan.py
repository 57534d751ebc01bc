"""Decoder layers stored stacked and run as one `jax.lax.scan`: traced and compiled once, whatever the depth.

`StackedLayers` holds one layer module whose variables carry a leading layer axis `L`
(`layers.stacked.self_attn.q_proj.kernel` is `[L, D, H*K]`). The scan slices one layer per iteration
and the backward pass writes each layer's gradient into one stacked buffer, so the optimizer update, the
gradient norm and the compiled program see a handful of `[L, ...]` arrays instead of `L` times as many:
compile time stays flat with depth. Each stacked variable keeps its layer's logical axes behind an
unsplit leading axis, so under FSDP the loop gathers one layer at a time.

Hugging Face names, LoRA targets and PEFT adapters are per layer; `unstack_layer_dicts` and
`per_layer_view` give the per-layer layout where those are read or written.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from easytrain.errors import EasytrainError
from easytrain.models.remat import checkpointed

Array = jax.Array
#: `StackedLayers`' attribute holding the layer with stacked variables: the key in state paths.
STACKED = "stacked"


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


def _is_variable(x: Any) -> bool:
    return isinstance(x, nnx.Variable)


def _with_axes(variable: nnx.Variable, value: Any, axes: tuple | None) -> nnx.Variable:
    return variable.replace(value=value, out_sharding=axes) if axes is not None else variable.replace(value=value)


def _stacked_value(variable: nnx.Variable, value: Any) -> nnx.Variable:
    """One layer's `variable` holding the layers' stacked `value`; logical axes `(None, *axes)`: the layer
    axis unsplit."""
    axes = variable.get_metadata().get("out_sharding")
    return _with_axes(variable, value, (None, *axes) if axes else None)


def _layer_variable(variable: nnx.Variable, value: Any) -> nnx.Variable:
    """One layer's `value` of a stacked variable, with that layer's logical axes."""
    axes = variable.get_metadata().get("out_sharding")
    return _with_axes(variable, value, tuple(axes[1:]) if axes else None)


def _layer_states(state: nnx.State, values: Any) -> nnx.State:
    return jax.tree.map(_layer_variable, state, values, is_leaf=_is_variable)


def _values(state: nnx.State) -> Any:
    return jax.tree.map(lambda variable: variable.get_value(), state, is_leaf=_is_variable)


def _variable_paths(module: nnx.Module) -> list[tuple]:
    return [path for path, node in nnx.iter_graph(module) if isinstance(node, nnx.Variable)]


def _taken_value(module: nnx.Module, path: tuple, *, detach: bool) -> Any:
    """The value of `module`'s variable at `path`. With `detach`, the variable is removed from the module that
    held it: once the caller drops the value, only another holder of that variable object (a module merged from
    the same state) keeps it alive. Nothing is emptied, so such a holder keeps its values."""
    parent = module
    for key in path[:-1]:
        parent = _get(parent, key)
    value = _get(parent, path[-1]).get_value()
    if detach:
        _set(parent, path[-1], None)
    return value


def layer_slices(value: Any) -> list[Any]:
    """`value[0], value[1], ...`: one layer's copy each."""
    return [value[index] for index in range(value.shape[0])]


def _without_values(module: nnx.Module) -> tuple[nnx.GraphDef, list[list[tuple]]]:
    """`module`'s graph and, for its parameters and the rest, each variable's path and a copy of it without its
    value: the metadata to rebuild variables from, holding no array."""
    graphdef, *states = nnx.split(module, nnx.Param, ...)
    return graphdef, [[(path, variable.replace(value=None)) for path, variable in nnx.to_flat_state(state)]
                      for state in states]


def _rebuilt(graphdef: nnx.GraphDef, parts: list[list[tuple]], variable_with: Callable[..., nnx.Variable],
             values: dict[tuple, Any]) -> nnx.Module:
    """The module of `_without_values`, each variable `variable_with(metadata, values[path])`."""
    return nnx.merge(graphdef, *(nnx.from_flat_state([(path, variable_with(variable, values[path]))
                                                      for path, variable in part]) for part in parts))


def _stack(layers: Sequence[nnx.Module], *, consume: bool) -> nnx.Module:
    """One layer module holding `layers`' variables stacked, one variable at a time. With `consume`, each variable
    is taken out of its layer once its stack exists, so the devices hold at most one stacked weight more than the
    layers, not a second copy of all of them; otherwise the layers keep theirs."""
    graphdef, parts = _without_values(layers[0])
    stacked = {path: jnp.stack([_taken_value(layer, path, detach=consume) for layer in layers])
               for path in _variable_paths(layers[0])}
    return _rebuilt(graphdef, parts, _stacked_value, stacked)


#: Draws one layer may take from each random stream: layer `i`'s streams count from `(i + 1) * LAYER_DRAWS`.
LAYER_DRAWS = 1 << 20


def layer_rngs(rngs: nnx.Rngs, index: int | Array) -> nnx.Rngs:
    """Layer `index`'s random streams: each of `rngs`' streams with its key and its count starting at
    `(index + 1) * LAYER_DRAWS`, clear of the parent's own draws and of every other layer's.

    A layer's weights then depend on its index only, not on how many draws the layers before it took or on
    whether the layers are built one by one or by one vmap (`index` traced). Built one by one, every key
    stays a constant XLA folds, as when all layers draw from one stream in turn; one key per layer
    (`jax.random.split`) would make XLA derive each weight's key at run time, about 15 more small fusions per
    layer to compile."""
    layer = nnx.Rngs(**{name: stream.key[...] for name, stream in rngs.items()})
    for _, stream in layer.items():
        stream.count[...] = (jnp.asarray(index, jnp.uint32) + 1) * LAYER_DRAWS
    return layer


def build_layers(make_layer: Callable[[nnx.Rngs], nnx.Module], num_layers: int, rngs: nnx.Rngs, *,
                 stacked: bool) -> nnx.List | StackedLayers:
    """`num_layers` layers, layer `i` built by `make_layer(layer_rngs(rngs, i))`: one by one as an `nnx.List`, or
    stacked (`StackedLayers.build`), with the same weights either way."""
    if num_layers >= (1 << 32) // LAYER_DRAWS:
        raise ValueError(f"build_layers: {num_layers} layers; at most {(1 << 32) // LAYER_DRAWS - 1} have their own "
                         "random streams.")
    if stacked:
        return StackedLayers.build(make_layer, num_layers, rngs)
    return nnx.List(make_layer(layer_rngs(rngs, index)) for index in range(num_layers))


class StackedLayers(nnx.Module):
    """`L` layers built alike, stored as one layer whose variables are stacked along a leading axis.

    Built from a list of layers (`StackedLayers(layers)`, one copy of their variables; with `consume=True` each
    variable is taken out of its layer once stacked), or stacked from the start with no list ever made
    (`build_layers`); turned back into a list by `unstack()`. `scan` runs them in order as one `jax.lax.scan`;
    indexing and iterating give per-layer modules (copies of one layer's slices: for reading, or a decode loop
    run once per call).
    """

    def __init__(self, layers: Sequence[nnx.Module] = (), *, stacked: nnx.Module | None = None,
                 num_layers: int = 0, consume: bool = False):
        if stacked is None:
            check_uniform(layers)
            stacked, num_layers = _stack(layers, consume=consume), len(layers)
        self.num_layers = num_layers
        self.stacked = stacked  # the attribute `STACKED` names

    @classmethod
    def build(cls, make_layer: Callable[[nnx.Rngs], nnx.Module], num_layers: int, rngs: nnx.Rngs) -> StackedLayers:
        """`build_layers(make_layer, num_layers, rngs, stacked=True)`: the layers built stacked by one `jax.vmap`
        of one layer's construction, so the initialisation is traced and compiled once whatever the depth, and
        no per-layer copy is ever made."""
        traced = []  # the one layer the vmap traces: its structure and variables' metadata, values replaced below

        def layer_values(index: Array) -> tuple[Any, Any]:
            traced.append(nnx.split(make_layer(layer_rngs(rngs, index)), nnx.Param, ...))
            return _values(traced[-1][1]), _values(traced[-1][2])

        param_values, rest_values = jax.vmap(layer_values)(jnp.arange(num_layers, dtype=jnp.uint32))
        graphdef, params, rest = traced[0]
        stack = lambda state, values: jax.tree.map(_stacked_value, state, values, is_leaf=_is_variable)  # noqa: E731
        return cls(stacked=nnx.merge(graphdef, stack(params, param_values), stack(rest, rest_values)),
                   num_layers=num_layers)

    def _split(self) -> tuple[nnx.GraphDef, nnx.State, nnx.State]:
        return nnx.split(self.stacked, nnx.Param, ...)

    def __len__(self) -> int:
        return self.num_layers

    def __getitem__(self, index: int) -> nnx.Module:
        if not -self.num_layers <= index < self.num_layers:
            raise IndexError(f"layer {index} of {self.num_layers}")
        graphdef, params, rest = self._split()
        take = lambda state: _layer_states(state, jax.tree.map(lambda v: v[index], _values(state)))  # noqa: E731
        return nnx.merge(graphdef, take(params), take(rest))

    def __iter__(self) -> Iterator[nnx.Module]:
        return (self[index] for index in range(self.num_layers))

    def unstack(self, *, consume: bool = False) -> list[nnx.Module]:
        """The layers as separate modules (one copy of their variables). With `consume`, each stacked variable is
        taken out of this module once sliced, so the devices hold at most one stacked weight more than the layers;
        this module is then left without its variables (a model switching its own layout drops it)."""
        graphdef, parts = _without_values(self.stacked)
        slices = {path: layer_slices(_taken_value(self.stacked, path, detach=consume))
                  for path in _variable_paths(self.stacked)}
        return [_rebuilt(graphdef, parts, _layer_variable, {path: values[index] for path, values in slices.items()})
                for index in range(self.num_layers)]

    def scan(self, carry: Any, fn: Callable[[nnx.Module, Any, Any], Any], xs: Any = None, *,
             policy: str = "none") -> Any:
        """`for layer, x in zip(layers, xs): carry = fn(layer, carry, x)`, as one `jax.lax.scan`.

        `xs` holds per-layer inputs along a leading axis (None: none). The body runs under the remat `policy`
        (`easytrain.models.remat.POLICIES`). Variables a layer changes in place (RNG stream counts of LoRA
        dropout) are written back, each layer's to its own slice, as the unrolled loop would leave them.
        """
        graphdef, params, rest = self._split()
        changed = []  # whether the traced body left a new value in any variable

        def body(carry: Any, sliced: tuple[Any, Any, Any]) -> tuple[Any, Any]:
            param_values, rest_values, x = sliced
            layer = nnx.merge(graphdef, _layer_states(params, param_values), _layer_states(rest, rest_values))
            carry = fn(layer, carry, x)
            after = _values(nnx.state(layer, nnx.Not(nnx.Param)))
            before = jax.tree.leaves(rest_values)
            changed.append(any(new is not old for new, old in zip(jax.tree.leaves(after), before)))
            return carry, after

        carry, new_rest = jax.lax.scan(checkpointed(body, policy), carry, (_values(params), _values(rest), xs))
        # Written back only when the layers changed something (as the unrolled loop would leave it): a layer
        # that changes nothing (eval mode) leaves the module untouched, so a scan may run inside a loop of
        # another trace level (decoding in a `while_loop`) without mutating variables from outside it.
        if any(changed):
            nnx.replace_by_pure_dict(rest, new_rest)
            nnx.update(self.stacked, rest)
        return carry


def is_stacked_node(node: Any) -> bool:
    """A pure-dict node that is a `StackedLayers`' state: `{STACKED: {...}}`."""
    return isinstance(node, dict) and set(node) == {STACKED}


def unstack_layer_dicts(tree: Any, take: Callable[[Any, int], Any] = lambda value, index: value[index]) -> Any:
    """A pytree of pure dicts (`nnx.to_pure_dict` of a module or its parameters, a train state, optimizer
    moments) with every `StackedLayers` node `{STACKED: sub}` replaced by the per-layer layout
    `{0: take(sub, 0), 1: ...}`, as unstacked layers have it.

    `take(value, index)` slices one leaf (default: index it, a copy on device); an exporter can pass a lazy
    slice, so that only one layer's tensor at a time is ever copied.
    """
    def unstack(node: Any) -> Any:
        if not is_stacked_node(node):
            return node
        count = jax.tree.leaves(node[STACKED])[0].shape[0]
        return {index: jax.tree.map(lambda value, i=index: take(value, i), node[STACKED]) for index in range(count)}

    return jax.tree.map(unstack, tree, is_leaf=is_stacked_node)


def _is_layer_list(node: Any) -> bool:
    """A pure-dict node of separate layers (an `nnx.List`): keys 0 .. n-1."""
    return isinstance(node, dict) and bool(node) and set(node) == set(range(len(node)))


def stack_layer_dicts(tree: Any, where: Callable[[tuple], bool],
                      stack: Callable[..., Any] = lambda *values: jnp.stack(values)) -> Any:
    """The inverse of `unstack_layer_dicts`: every node of separate layers `{0: sub_0, 1: ...}` whose
    `jax.tree_util` path `where(path)` accepts becomes `{STACKED: stack(sub_0[leaf], sub_1[leaf], ...)}`."""
    def restack(path: tuple, node: Any) -> Any:
        if not (_is_layer_list(node) and where(path)):
            return node
        return {STACKED: jax.tree.map(stack, *(node[index] for index in range(len(node))))}

    return jax.tree_util.tree_map_with_path(restack, tree, is_leaf=_is_layer_list)


def abstract_layer(leaf: jax.ShapeDtypeStruct) -> jax.ShapeDtypeStruct:
    """One layer of an abstract stacked array: the leading axis dropped, from its sharding too."""
    sharding = leaf.sharding
    if isinstance(sharding, NamedSharding):
        sharding = NamedSharding(sharding.mesh, P(*tuple(sharding.spec)[1:]))
    return jax.ShapeDtypeStruct(leaf.shape[1:], leaf.dtype, sharding=sharding)


def abstract_stack(*leaves: jax.ShapeDtypeStruct) -> jax.ShapeDtypeStruct:
    """The abstract stack of layers' arrays: a leading axis, unsplit, before the first layer's axes."""
    sharding = leaves[0].sharding
    if isinstance(sharding, NamedSharding):
        sharding = NamedSharding(sharding.mesh, P(None, *sharding.spec))
    return jax.ShapeDtypeStruct((len(leaves), *leaves[0].shape), leaves[0].dtype, sharding=sharding)


def is_stacked_path(path: Sequence[Any]) -> bool:
    """Whether a state path (keys or `jax.tree_util` path entries) runs through a `StackedLayers`' layer."""
    return any(getattr(key, "key", key) == STACKED for key in path)


def _get(parent: nnx.Module, key: str | int) -> Any:
    return parent[key] if isinstance(key, int) else getattr(parent, key)


def _set(parent: nnx.Module, key: str | int, value: nnx.Module) -> None:
    if isinstance(key, int):
        parent[key] = value
    else:
        setattr(parent, key, value)


def _stacked_groups(model: nnx.Module) -> list[tuple[nnx.Module, str | int]]:
    """(parent, attribute or index) of every `StackedLayers` in `model`."""
    groups = []
    for path, node in nnx.iter_modules(model):
        if isinstance(node, StackedLayers):
            parent = model
            for key in path[:-1]:
                parent = _get(parent, key)
            groups.append((parent, path[-1]))
    return groups


def per_layer_view(model: nnx.Module) -> nnx.Module:
    """`model` itself if no `StackedLayers` is in it, else a module that shares its other variables and holds
    each stacked group as separate layers (one copy of the stacked variables): what per-layer names
    (Hugging Face, LoRA targets, PEFT adapters) are read from."""
    if not _stacked_groups(model):
        return model
    view = nnx.merge(*nnx.split(model))  # new module objects over the same arrays
    for parent, key in _stacked_groups(view):
        _set(parent, key, nnx.List(_get(parent, key).unstack()))
    return view


@contextlib.contextmanager
def layers_unstacked(model: nnx.Module) -> Iterator[nnx.Module]:
    """Inside the block every `StackedLayers` of `model` is separate layers, in place (what per-layer changes
    such as adding LoRA adapters act on); restacked on leaving it. Each way moves the layer variables one at a
    time (at most one stacked weight more than the model)."""
    groups = _stacked_groups(model)
    for parent, key in groups:
        _set(parent, key, nnx.List(_get(parent, key).unstack(consume=True)))
    try:
        yield model
    finally:
        for parent, key in groups:
            _set(parent, key, StackedLayers(list(_get(parent, key)), consume=True))
