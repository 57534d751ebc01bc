"""Adafactor that treats each layer of a stacked weight as its own array.

optax's `adafactor` scales and clips every array's update by that array's root mean square, and factors the
second moments of its two longest axes. On layers stored stacked (`scan_layers`,
`easytrain.models.scan.StackedLayers`) one array holds every layer, so those statistics would mix the layers
(and with 128 layers or more the layer axis itself would be factored) and the run would train unlike the
per-layer model. Here the two RMS steps reduce over all but the layer axis of a stacked leaf, and the factored
second moments are optax's own, mapped over the layers (`jax.vmap`). On a tree without stacked leaves it is
optax's `adafactor` (same updates, same state types, so its checkpoints restore).
"""

from __future__ import annotations

import functools
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax

from easytrain.models.scan import is_stacked_path


def _layer_rms(x: jax.Array, stacked: bool) -> jax.Array:
    """Root mean square of the whole array, or of each layer of a stacked one (kept broadcastable)."""
    if not stacked:
        return jnp.sqrt(jnp.mean(jnp.square(x)))
    return jnp.sqrt(jnp.mean(jnp.square(x), axis=tuple(range(1, x.ndim)), keepdims=True))


def _map_stacked(fn: Callable[..., jax.Array], *trees: Any) -> Any:
    """`fn(stacked, *leaves)` over matching leaves; `stacked`: the leaf is a layer of a stacked variable."""
    return jax.tree_util.tree_map_with_path(lambda path, *leaves: fn(is_stacked_path(path), *leaves), *trees)


def clip_by_layer_rms(threshold: float) -> optax.GradientTransformation:
    """`optax.clip_by_block_rms`, per layer on stacked leaves."""
    def update(updates: Any, state: optax.EmptyState, params: Any = None) -> tuple[Any, optax.EmptyState]:
        clip = lambda stacked, u: u / jnp.maximum(1.0, _layer_rms(u, stacked) / threshold)  # noqa: E731
        return _map_stacked(clip, updates), state

    return optax.GradientTransformation(optax.init_empty_state, update)


def scale_by_param_layer_rms(min_scale: float = 1e-3) -> optax.GradientTransformation:
    """`optax.scale_by_param_block_rms`, per layer on stacked leaves."""
    def update(updates: Any, state: optax.EmptyState, params: Any = None) -> tuple[Any, optax.EmptyState]:
        scale = lambda stacked, u, p: u * jnp.maximum(_layer_rms(p, stacked), min_scale)  # noqa: E731
        return _map_stacked(scale, updates, params), state

    return optax.GradientTransformation(optax.init_empty_state, update)


class _LeafResult(NamedTuple):
    """One leaf's update and new statistics from `optax.scale_by_factored_rms`."""
    update: jax.Array
    v_row: jax.Array
    v_col: jax.Array
    v: jax.Array


def factored_rms_per_layer() -> optax.GradientTransformation:
    """`optax.scale_by_factored_rms` (its defaults) on each leaf, and on each layer of a stacked leaf alone.

    optax factors the two longest axes of an array of at least two axes of 128 or more; a stacked leaf is
    mapped over its layer axis, so each layer is factored (or not) as its per-layer array would be. The state
    is optax's `FactoredState`; a stacked leaf's statistics, and the `(1,)` placeholders optax keeps for the
    statistics a leaf does not use, are the per-layer ones stacked (`(L, 1)` placeholders), so that they split
    and stack by layer when a checkpoint changes layout.
    """
    inner = optax.scale_by_factored_rms()
    per_layer_state = optax.FactoredState(count=None, v_row=0, v_col=0, v=0)  # vmap axes: one count, L statistics
    is_result = lambda x: isinstance(x, (_LeafResult, optax.FactoredState))  # noqa: E731

    def leaf_init(stacked: bool, param: jax.Array) -> optax.FactoredState:
        return (jax.vmap(inner.init, out_axes=per_layer_state) if stacked else inner.init)(param)

    def leaf_update(count: jax.Array, stacked: bool, update: jax.Array, v_row: jax.Array, v_col: jax.Array,
                    v: jax.Array, param: jax.Array) -> _LeafResult:
        apply = inner.update
        if stacked:
            apply = jax.vmap(inner.update, in_axes=(0, per_layer_state, 0), out_axes=(0, per_layer_state))
        new_update, new = apply(update, optax.FactoredState(count, v_row, v_col, v), param)
        return _LeafResult(new_update, new.v_row, new.v_col, new.v)

    def field(results: Any, name: str) -> Any:
        return jax.tree.map(lambda result: getattr(result, name), results, is_leaf=is_result)

    def init(params: Any) -> optax.FactoredState:
        states = _map_stacked(leaf_init, params)
        return optax.FactoredState(jnp.zeros([], jnp.int32), *(field(states, n) for n in ("v_row", "v_col", "v")))

    def update(updates: Any, state: optax.FactoredState, params: Any = None) -> tuple[Any, optax.FactoredState]:
        if params is None:
            raise ValueError("adafactor's factored statistics need the parameters: pass params to update().")
        results = _map_stacked(functools.partial(leaf_update, state.count), updates, state.v_row, state.v_col,
                               state.v, params)
        new_state = optax.FactoredState(optax.safe_increment(state.count),
                                        *(field(results, n) for n in ("v_row", "v_col", "v")))
        return field(results, "update"), new_state

    return optax.GradientTransformation(init, update)


def clip_then_decay(threshold: float, rate: float | None, mask: Any = None,
                    min_scale: float = 1e-3) -> optax.GradientTransformation:
    """`clip_by_layer_rms`, then `rate * param / max(rms(param), min_scale)` added on the `mask`ed leaves: once
    the update is scaled by the learning rate and by that same RMS (`scale_by_param_layer_rms`), the decay is
    `lr * rate * param`, decoupled weight decay as AdamW's. Done here, not after the scalings as optax does
    (`rate * param` per update, whatever the learning rate), so that the chain's states keep their places and
    checkpoints of either restore."""
    clip = clip_by_layer_rms(threshold)

    def update(updates: Any, state: optax.EmptyState, params: Any = None) -> tuple[Any, optax.EmptyState]:
        updates, state = clip.update(updates, state, params)
        if not rate:
            return updates, state
        if params is None:
            raise ValueError("adafactor's weight decay needs the parameters: pass params to update().")
        decayed = jax.tree.map(lambda _: True, params) if mask is None else (mask(params) if callable(mask) else mask)
        decay = lambda stacked, u, p, on: u + rate * p / jnp.maximum(_layer_rms(p, stacked), min_scale) if on else u  # noqa: E731,E501
        return _map_stacked(decay, updates, params, decayed), state

    return optax.GradientTransformation(optax.init_empty_state, update)


def adafactor(learning_rate: optax.ScalarOrSchedule, weight_decay_rate: float | None = None,
              weight_decay_mask: Any = None) -> optax.GradientTransformationExtraArgs:
    """optax's `adafactor` with its defaults (factored second moments, update clipping at RMS 1, updates
    scaled by the parameter's RMS), each statistic per layer on stacked leaves, and weight decay multiplied by
    the learning rate, as AdamW's and Lion's are (`clip_then_decay`; optax's is not). Its state is optax's,
    position for position."""
    steps = [factored_rms_per_layer(), clip_then_decay(1.0, weight_decay_rate, weight_decay_mask),
             optax.scale_by_learning_rate(learning_rate, flip_sign=False), scale_by_param_layer_rms()]
    if weight_decay_rate is not None:  # where optax adds its decay: the same (empty) state in the same place
        placeholder = optax.identity()
        steps.append(placeholder if weight_decay_mask is None else optax.masked(placeholder, weight_decay_mask))
    return optax.chain(*steps, optax.scale(-1))
