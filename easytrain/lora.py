"""Low-rank adapters (LoRA) on easytrain's models, laid out and initialised as Hugging Face PEFT does.

``apply_lora`` swaps each targeted ``Dense`` for a ``LoRADense`` that keeps the very same ``kernel`` and
``bias`` variables (no copy of the base weights; their paths stay ``.../q_proj/kernel``) and adds two
``nnx.LoRAParam`` matrices beside them::

    y = x @ kernel + bias + dropout(x) @ lora_a @ lora_b * scaling      scaling = alpha / rank

``lora_a`` ``[in, rank]`` starts like PEFT's ``lora_A`` (Kaiming-uniform, bound ``1/sqrt(in)``) and
``lora_b`` ``[rank, out]`` at zero, so an adapted model computes exactly what its base did until it is
trained. Their logical axes follow the kernel's (``lora_a``: ``(kernel_in_axis, None)``, ``lora_b``:
``(None, kernel_out_axis)``), so on an FSDP or tensor-parallel mesh they are split like the weight they
adapt. ``lora_trainable(config)`` is the NNX filter a trainer's ``trainable`` takes: the adapters (plus
embeddings and norms when asked), never the base weights.

Module names are Hugging Face's (``model.layers.0.self_attn.q_proj``, ``lm_head``) and
``target_modules`` matches them as PEFT does, so a config round-trips through ``adapter_config.json``
(see ``easytrain.models.peft_io``).
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
import re
from collections.abc import Iterator, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from easytrain import integrity
from easytrain.models.layers import Dense, in_use
from easytrain.models.scan import layers_unstacked
from easytrain.lora_config import (ALL_LINEAR, DEFAULT_TARGET_MODULES, INIT_A_CHOICES, LoRAConfig,  # noqa: F401
                                   LoRAConfigError, LoRAError, EMBEDDING_MODULES)
from easytrain.sharding import constrain

Filter = nnx.filterlib.Filter
logger = logging.getLogger("easytrain")
ModulePath = tuple[str | int, ...]

# ---------------------------------------------------------------------------------------------- module


def _kernel_axes(kernel: nnx.Variable) -> tuple[Any, Any]:
    axes = kernel.get_metadata().get("out_sharding")
    return tuple(axes) if axes else (None, None)


def _placed_sharding(value: Any) -> NamedSharding | None:
    """``value``'s sharding when it is a concrete array committed to a mesh; None otherwise (a tracer, an
    abstract value, an array left on the default device)."""
    if isinstance(value, jax.core.Tracer) or not isinstance(value, jax.Array) or not value.committed:
        return None
    sharding = value.sharding
    return sharding if isinstance(sharding, NamedSharding) else None


@functools.lru_cache(maxsize=64)
def _kernel_merge(sharding: NamedSharding | None) -> Any:
    """``kernel + delta`` in float32, back in the kernel's dtype, placed as `sharding`: one jitted function per
    placement, kept, so a model's kernels of one shape share a program at every merge (a jit made per kernel traced
    and lowered again per layer and per export)."""
    return jax.jit(lambda kernel, delta: (kernel.astype(jnp.float32) + delta).astype(kernel.dtype),
                   out_shardings=sharding)


@functools.lru_cache(maxsize=64)
def _abstract_dense(in_features: int, out_features: int, axes: tuple[Any, Any], use_bias: bool, dtype: Any,
                    param_dtype: Any) -> Dense:
    """A shape-only ``Dense`` to clone for a merged layer, built once per layout: building one traces its
    initialisers (a trace per adapted layer at every merge)."""
    with nnx.use_eager_sharding(False):
        return nnx.eval_shape(lambda: Dense(in_features, out_features, axes=axes, use_bias=use_bias, std=0.0,
                                            dtype=dtype, param_dtype=param_dtype, rngs=nnx.Rngs(0)))


def _placed_like(array: jax.Array, kernel_value: Any, dims: tuple[int | None, int | None]) -> jax.Array:
    """``array`` on the kernel's mesh, its axes split as the kernel's axes ``dims`` are (None: unsplit)."""
    kernel_sharding = _placed_sharding(kernel_value)
    if kernel_sharding is None:
        return array
    kernel_spec = tuple(kernel_sharding.spec) + (None,) * (2 - len(kernel_sharding.spec))
    spec = P(*(None if d is None else kernel_spec[d] for d in dims))
    return jax.device_put(array, NamedSharding(kernel_sharding.mesh, spec))


def _init_a(rngs: nnx.Rngs, shape: tuple[int, int], how: str, rank: int, dtype: Any) -> jax.Array:
    key = rngs.params()
    if how == "gaussian":  # PEFT: nn.init.normal_(lora_A, std=1 / r)
        return (jax.random.normal(key, shape, jnp.float32) / rank).astype(dtype)
    # PEFT: kaiming_uniform_(lora_A.weight [r, in], a=sqrt(5)) -> U(-1/sqrt(in), 1/sqrt(in))
    bound = 1.0 / math.sqrt(shape[0])
    return jax.random.uniform(key, shape, jnp.float32, -bound, bound).astype(dtype)


class LoRADense(Dense):
    """A ``Dense`` plus a low-rank update: ``x @ kernel + bias + dropout(x) @ lora_a @ lora_b * scaling``.

    Built from an existing ``Dense`` whose ``kernel`` and ``bias`` variables it takes over (the same
    objects, so no weight is copied and parameter paths are unchanged). The adapter matmuls run in the
    layer's compute dtype.
    """

    def __init__(self, base: Dense, *, rank: int, scaling: float, dropout: float = 0.0,
                 init_a: str = "kaiming_uniform", param_dtype: Any = jnp.float32, rngs: nnx.Rngs):
        if isinstance(base, LoRADense):
            raise LoRAError("this layer already has adapters; merge_lora it first or adapt the base model.")
        self.kernel = base.kernel
        self.bias = base.bias
        self.dtype = base.dtype
        kernel_value = base.kernel.get_value()
        in_features, out_features = kernel_value.shape
        in_axis, out_axis = _kernel_axes(base.kernel)
        dtype = kernel_value.dtype if param_dtype is None else jnp.dtype(param_dtype)
        a = _placed_like(_init_a(rngs, (in_features, rank), init_a, rank, dtype), kernel_value, (0, None))
        b = _placed_like(jnp.zeros((rank, out_features), dtype), kernel_value, (None, 1))
        self.lora_a = nnx.LoRAParam(a, out_sharding=(in_axis, None))
        self.lora_b = nnx.LoRAParam(b, out_sharding=(None, out_axis))
        self.scaling = float(scaling)
        self.lora_dropout = nnx.Dropout(dropout, rngs=rngs) if dropout > 0 else None
        self.adapter_enabled = True

    @property
    def rank(self) -> int:
        return int(self.lora_a.shape[1])

    def __call__(self, x_MI: jax.Array, *, out_dtype: Any = None) -> jax.Array:
        y_MO = super().__call__(x_MI, out_dtype=out_dtype)
        if not self.adapter_enabled:
            return y_MO
        if self.lora_dropout is not None:
            x_MI = self.lora_dropout(x_MI)
        h_MR = jnp.dot(x_MI.astype(self.dtype), in_use(self.lora_a, self.dtype))
        h_MR = constrain(h_MR, ("batch", None))
        delta_MO = jnp.dot(h_MR, in_use(self.lora_b, self.dtype), preferred_element_type=out_dtype)
        return y_MO + (delta_MO * self.scaling).astype(y_MO.dtype)

    def delta(self) -> jax.Array:
        """``scaling * lora_a @ lora_b`` in float32, laid out like the kernel ``[in, out]``."""
        a = self.lora_a[...].astype(jnp.float32)
        b = self.lora_b[...].astype(jnp.float32)
        return jnp.dot(a, b, precision=jax.lax.Precision.HIGHEST) * self.scaling

    def merged(self) -> Dense:
        """A plain ``Dense`` whose kernel is ``kernel + scaling * lora_a @ lora_b`` (same dtype, axes, placement)."""
        kernel = self.kernel.get_value()
        new_kernel = _kernel_merge(_placed_sharding(kernel))(kernel, self.delta())
        dense = nnx.clone(_abstract_dense(*kernel.shape, _kernel_axes(self.kernel), self.bias is not None,
                                          self.dtype, kernel.dtype))
        dense.kernel = self.kernel.replace(new_kernel)
        dense.bias = self.bias
        return dense


# ---------------------------------------------------------------------------------------------- names


def hf_module_name(path: ModulePath) -> str:
    """Hugging Face (and PEFT) name of an easytrain module path: ``layers/0/mlp/up_proj`` ->
    ``model.layers.0.mlp.up_proj``; ``lm_head`` stays ``lm_head``."""
    dotted = ".".join(str(p) for p in path)
    return dotted if path and path[0] == "lm_head" else "model." + dotted


def matches(name: str, targets: Sequence[str] | str) -> bool:
    """PEFT's rule: a string is a regular expression over the whole name, a list matches by name suffix;
    ``"all-linear"`` is every module but the output head (only dense layers are ever adapted)."""
    if targets == ALL_LINEAR:
        return name != "lm_head"
    if isinstance(targets, str):
        return re.fullmatch(targets, name) is not None
    return any(name == t or name.endswith("." + t) for t in targets)


def lora_modules(model: nnx.Module) -> dict[str, LoRADense]:
    """Hugging Face module name -> adapted layer, in graph order."""
    return {hf_module_name(path): node for path, node in nnx.iter_modules(model) if isinstance(node, LoRADense)}


#: Flax layers LoRA does not adapt, named in errors with the route that gives them adapters.
_FLAX_LINEAR = (nnx.Linear, nnx.LinearGeneral, nnx.Einsum)
_FLAX_ROUTE = ("only easytrain.models.layers.Dense layers take adapters from LoRAConfig / lora_rank; flax nnx.Linear "
               "layers do not. Build those layers as Dense, or as flax's nnx.LoRALinear and train only its adapters "
               "with `trainable = nnx.LoRAParam` and lora_rank 0 (docs/lora.md, LoRA on a custom module)")


def _targets(model: nnx.Module, config: LoRAConfig) -> dict[ModulePath, Dense]:
    """The dense layers ``config.target_modules`` names, less a head ``train_embeddings`` trains in full (PEFT's rule);
    raises when a name (unless ``config.strict_targets`` is off) or the pattern finds none."""
    modules = [(path, node) for path, node in nnx.iter_modules(model) if path]
    dense = {path: node for path, node in modules if isinstance(node, Dense)}
    flax_linear = [hf_module_name(p) for p, n in modules if isinstance(n, _FLAX_LINEAR)]
    if not dense:
        raise LoRAConfigError("target_modules", f"this model has no dense layer to adapt{_listed(flax_linear)}: "
                                                f"{_FLAX_ROUTE}.")
    chosen = {path: node for path, node in dense.items() if matches(hf_module_name(path), config.target_modules)}
    other = [] if config.target_modules == ALL_LINEAR else sorted(
        hf_module_name(p) for p, n in modules if not isinstance(n, Dense) and matches(hf_module_name(p),
                                                                                    config.target_modules))
    if other:
        why = _FLAX_ROUTE if set(other) & set(flax_linear) else ("LoRA adapts dense layers only (use train_embeddings "
                                                                  "/ train_norms to train embeddings or norms)")
        raise LoRAConfigError("target_modules", f"{config.target_modules!r} names modules that are not dense "
                                                f"layers: {other[:4]}; {why}.")
    names = sorted({_leaf_name(p) for p in dense})
    also = f" ({_FLAX_ROUTE}: {flax_linear[:4]})" if flax_linear else ""
    if isinstance(config.target_modules, str):
        if not chosen:
            raise LoRAConfigError("target_modules", f"the pattern {config.target_modules!r} matches no dense layer "
                                                    f"of this model; it must match a whole name such as "
                                                    f"{hf_module_name(next(iter(dense)))!r}. Dense layers: "
                                                    f"{names}{also}.")
        return _without_saved_modules(chosen, config)
    unused = [t for t in config.target_modules if not any(matches(hf_module_name(p), (t,)) for p in dense)]
    _check_tied_head(model, unused)
    if unused and (config.strict_targets or not chosen):
        raise LoRAConfigError("target_modules", f"{unused} match no dense layer of this model; its dense "
                                                f"layers are named {names}{also}.")
    if unused:
        logger.info("target_modules %s match no dense layer of this model; skipped, as PEFT skips them", unused)
    return _without_saved_modules(chosen, config)


def _check_tied_head(model: nnx.Module, unused: list[str]) -> None:
    """Refuse a head target on a model whose head is its input embedding (``tie_word_embeddings``): there is no head
    layer to adapt here, and PEFT, which adapts the tied head, would compute another model (not skipped)."""
    head = [t for t in unused if t == "lm_head" or t.endswith(".lm_head")]
    if head and getattr(getattr(model, "config", None), "tie_word_embeddings", False):
        raise LoRAConfigError("target_modules", f"{head} names the output head, which is tied to the input "
                                                "embeddings in this base (tie_word_embeddings): it has no head layer "
                                                "of its own to adapt. Drop lm_head from target_modules (or train the "
                                                "tied embedding in full with train_embeddings).")


def _listed(names: list[str]) -> str:
    return f" (its flax nnx.Linear layers: {names[:4]}{' ...' if len(names) > 4 else ''})" if names else ""


def _without_saved_modules(chosen: dict[ModulePath, Dense], config: LoRAConfig) -> dict[ModulePath, Dense]:
    """``chosen`` less the output head when ``train_embeddings`` trains it in full: PEFT adapts no module that
    ``modules_to_save`` names, so the export computes in PEFT what it does here (an adapter on a fully trained
    kernel would add nothing it cannot learn)."""
    saved = sorted(hf_module_name(p) for p in chosen if config.train_embeddings and _leaf_name(p) in EMBEDDING_MODULES)
    if not saved:
        return chosen
    if len(saved) == len(chosen):
        raise LoRAConfigError("target_modules", f"{config.target_modules!r} selects only {saved}, which "
                                                "train_embeddings trains in full (PEFT's modules_to_save, which takes "
                                                "no adapter): name other layers to adapt, or drop train_embeddings.")
    logger.info("%s: trained in full (train_embeddings), so it takes no adapter although target_modules names it, "
                "as in PEFT (modules_to_save wins over target_modules)", ", ".join(saved))
    return {path: node for path, node in chosen.items() if hf_module_name(path) not in saved}


def _leaf_name(path: ModulePath) -> str:
    return str(path[-1])


def _set_child(model: nnx.Module, path: ModulePath, module: nnx.Module) -> None:
    parent: Any = model
    for key in path[:-1]:
        parent = parent[key] if isinstance(key, int) else getattr(parent, key)
    if isinstance(path[-1], int):
        parent[path[-1]] = module
    else:
        setattr(parent, path[-1], module)


# ---------------------------------------------------------------------------------------------- API


def apply_lora(model: nnx.Module, config: LoRAConfig, rngs: nnx.Rngs | int = 0) -> nnx.Module:
    """Adds adapters to the targeted dense layers of ``model``, in place, and returns it.

    The base weights are not copied or changed: each adapted layer keeps its ``kernel``/``bias`` variables
    (same paths, same buffers, same sharding). New adapters are placed on the base kernel's mesh when it
    is on one. Until ``lora_b`` is trained the model's outputs are unchanged.

    Args:
        model: An easytrain model (e.g. from ``easytrain.models.from_pretrained``), possibly pretrained.
        config: What to adapt; ``target_modules`` must each match at least one dense layer.
        rngs: ``rngs.params`` draws ``lora_a``; with ``config.dropout > 0`` each adapted layer forks its
            dropout stream from ``rngs.dropout`` (``rngs.default`` when absent); an int seeds ``nnx.Rngs``.

    Returns:
        ``model``, its targeted layers now ``LoRADense``.

    Raises:
        LoRAConfigError: ``target_modules`` matches nothing, or names a module that is not a dense layer.
        LoRAError: A targeted layer already has adapters.
    """
    if not isinstance(config, LoRAConfig):
        raise TypeError(f"config must be a LoRAConfig, got {type(config).__name__}.")
    rngs = nnx.Rngs(rngs) if isinstance(rngs, int) else rngs
    with layers_unstacked(model):  # targets are named per layer; stacked layers are restacked with adapters
        return _apply(model, config, rngs)


def _apply(model: nnx.Module, config: LoRAConfig, rngs: nnx.Rngs) -> nnx.Module:
    targets = _targets(model, config)
    if done := sorted(hf_module_name(p) for p, n in targets.items() if isinstance(n, LoRADense)):
        raise LoRAError(f"{done[:4]} already have adapters; apply_lora once per model (merge_lora first to "
                        "stack a second adapter on the merged weights).")
    param_dtype = None if config.param_dtype is None else jnp.dtype(config.param_dtype)
    with nnx.use_eager_sharding(False):
        for path, dense in targets.items():
            _set_child(model, path, LoRADense(dense, rank=config.rank, scaling=config.scaling,
                                              dropout=config.dropout, init_a=config.init_a,
                                              param_dtype=param_dtype, rngs=rngs))
    return model


def merge_lora(model: nnx.Module) -> nnx.Module:
    """A copy of ``model`` with every adapter folded into its kernel (``kernel + scaling * A @ B``) and removed.

    ``model`` itself is left as it was (it can keep training); the copy shares every array that merging
    does not change, so only the adapted kernels take new memory. The result has plain ``Dense`` layers
    and exports with ``easytrain.models.save_pretrained``.
    """
    graphdef, state = nnx.split(model)
    merged = nnx.merge(graphdef, state)
    with layers_unstacked(merged):
        for path, node in [(p, n) for p, n in nnx.iter_modules(merged) if isinstance(n, LoRADense)]:
            _set_child(merged, path, node.merged())
    return merged


@contextlib.contextmanager
def adapters_disabled(model: nnx.Module) -> Iterator[nnx.Module]:
    """Inside the block ``model`` computes as its base model (every adapter skipped), e.g. the reference
    policy of DPO on a LoRA model without a second copy of the weights. Works inside a traced step."""
    modules = list(lora_modules(model).values())
    previous = [m.adapter_enabled for m in modules]
    for module in modules:
        module.adapter_enabled = False
    try:
        yield model
    finally:
        for module, enabled in zip(modules, previous):
            module.adapter_enabled = enabled


def lora_trainable(config: LoRAConfig | None = None) -> Filter:
    """The NNX filter of what LoRA trains: every ``nnx.LoRAParam``, plus the embedding/head and the norm
    scales when ``config`` asks. Equal configs give equal (and hashable) filters."""
    parts: list[Filter] = [nnx.LoRAParam]
    if config is not None and config.train_embeddings:
        parts.append(nnx.All(nnx.Param, nnx.Any(*(nnx.PathContains(name) for name in EMBEDDING_MODULES))))
    if config is not None and config.train_norms:
        parts.append(nnx.All(nnx.Param, nnx.PathContains("scale")))
    return parts[0] if len(parts) == 1 else nnx.Any(*parts)


def adapter_state(model: nnx.Module, config: LoRAConfig | None = None) -> dict:
    """The trained variables as a pure dict (paths as in the model): the adapters, plus embeddings/norms
    when ``config`` trains them. What an adapter-only checkpoint stores."""
    return nnx.to_pure_dict(nnx.state(model, lora_trainable(config)))


def base_state(model: nnx.Module, config: LoRAConfig | None = None) -> dict:
    """Every parameter that LoRA leaves frozen, as a pure dict."""
    return nnx.to_pure_dict(nnx.state(model, nnx.All(nnx.Param, nnx.Not(lora_trainable(config)))))


def base_fingerprint(model: nnx.Module, config: LoRAConfig | None = None) -> dict[str, list[int]]:
    """Content digests (``easytrain.integrity.fingerprint``) of the frozen base parameters.

    Stored beside an adapter-only checkpoint, it proves on restore that the adapters are put back on the
    very base weights they were trained on (same values, same dtype; any mesh or process count). Small arrays are
    digested on the host (the same values), as a trainer's set-up digests the base: no program compiled per shape.
    """
    return integrity.fingerprint(base_state(model, config), integrity.SMALL_ON_HOST)


def count_params(tree: Any) -> int:
    """Number of scalars in a pytree of arrays (e.g. ``adapter_state(model)``)."""
    return int(sum(np.prod(np.shape(leaf), dtype=np.int64) for leaf in jax.tree.leaves(tree)))
