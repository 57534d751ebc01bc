"""Adafactor that treats each layer of a stacked weight as its own array.

optax's `adafactor` scales and clips every array's update by that array's root mean square. On layers
stored stacked (`scan_layers`, `easytrain.models.scan.StackedLayers`) one array holds every layer, so those
statistics would mix the layers and the run would train unlike the per-layer model. Here the two RMS steps
reduce over all but the layer axis of a stacked leaf; optax's factored second moments are already per layer
whenever the layer axis is not one of the two it factors (checked at `init`). On a tree without stacked
leaves it is optax's `adafactor` (same updates, same state types, so its checkpoints restore).
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

from easytrain.errors import ArgumentError
from easytrain.models.scan import is_stacked_path

MIN_DIM_TO_FACTOR = 128  # optax's default: an axis shorter than this is never factored


def _factored_axes(shape: tuple[int, ...]) -> tuple[int, int] | None:
    """The two axes optax's `scale_by_factored_rms` factors for `shape` (the two longest), or None."""
    if len(shape) < 2:
        return None
    order = np.argsort(shape)
    return None if shape[order[-2]] < MIN_DIM_TO_FACTOR else (int(order[-2]), int(order[-1]))


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


def _check_factoring(params: Any) -> None:
    """Raise if optax would factor a stacked leaf along its layer axis (a layer count >= 128 among its two
    longest axes), where the per-layer arrays would be factored otherwise or not at all."""
    for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        if not is_stacked_path(path):
            continue
        per_layer = _factored_axes(tuple(leaf.shape[1:]))
        if _factored_axes(tuple(leaf.shape)) != (per_layer and (per_layer[0] + 1, per_layer[1] + 1)):
            name = jax.tree_util.keystr(path, simple=True, separator=".")
            raise ArgumentError("optimizer", f"adafactor would factor the stacked {name} {tuple(leaf.shape)} "
                                             "along its layer axis, unlike each layer's own array; use optimizer "
                                             "'adamw', 'lion' or 'sgd' with this many stacked layers, or "
                                             "scan_layers False.")


def _placeholders(shape: tuple[int, ...]) -> tuple[str, ...]:
    """The fields of optax's `FactoredState` that hold a `(1,)` placeholder, not a statistic, for a leaf."""
    return ("v",) if _factored_axes(shape) is not None else ("v_row", "v_col")


def _resize_placeholders(state: optax.FactoredState, params: Any, stacked_size: bool) -> optax.FactoredState:
    """Stacked leaves' placeholders as `(L, 1)` (`stacked_size`), so that they stack and split like every other
    per-layer statistic when a checkpoint changes layout, or back to optax's `(1,)`."""
    fields = {name: dict(jax.tree_util.tree_flatten_with_path(getattr(state, name))[0])
              for name in ("v_row", "v_col", "v")}
    for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        if not is_stacked_path(path):
            continue
        for name in _placeholders(tuple(leaf.shape)):
            value = fields[name][path]
            fields[name][path] = jnp.zeros((leaf.shape[0], 1) if stacked_size else (1,), value.dtype)
    rebuilt = {name: jax.tree_util.tree_unflatten(jax.tree.structure(getattr(state, name)), list(values.values()))
               for name, values in fields.items()}
    return state._replace(**rebuilt)


def factored_rms_per_layer() -> optax.GradientTransformation:
    """`optax.scale_by_factored_rms` (its defaults), whose state holds `(L, 1)` placeholders for stacked leaves.

    Its statistics are per layer already (`_check_factoring` refuses the case where they would not be); only
    the `(1,)` placeholders it keeps for unused statistics would not split into layers on a change of layout.
    """
    inner = optax.scale_by_factored_rms()

    def init(params: Any) -> optax.FactoredState:
        return _resize_placeholders(inner.init(params), params, stacked_size=True)

    def update(updates: Any, state: optax.FactoredState, params: Any = None) -> tuple[Any, optax.FactoredState]:
        updates, state = inner.update(updates, _resize_placeholders(state, params, stacked_size=False), params)
        return updates, _resize_placeholders(state, params, stacked_size=True)

    return optax.GradientTransformation(init, update)


def adafactor(learning_rate: optax.ScalarOrSchedule, weight_decay_rate: float | None = None,
              weight_decay_mask: Any = None) -> optax.GradientTransformationExtraArgs:
    """optax's `adafactor` with its defaults (factored second moments, update clipping at RMS 1, updates
    scaled by the parameter's RMS), each statistic per layer on stacked leaves."""
    steps = [factored_rms_per_layer(), clip_by_layer_rms(1.0),
             optax.scale_by_learning_rate(learning_rate, flip_sign=False), scale_by_param_layer_rms()]
    if weight_decay_rate is not None:
        steps.append(optax.add_decayed_weights(weight_decay_rate, mask=weight_decay_mask))
    chained = optax.chain(*steps, optax.scale(-1))

    def init(params: optax.Params) -> optax.OptState:
        _check_factoring(params)
        return chained.init(params)

    return chained._replace(init=init)
