"""Hugging Face checkpoints (``config.json`` + safetensors) in and out of easytrain.

Tensors travel as numpy arrays (bfloat16 through ml_dtypes), so easytrain never
needs torch at runtime. Parameter paths map to Hugging Face names by rule:
``layers/0/self_attn/q_proj/kernel`` <-> ``model.layers.0.self_attn.q_proj.weight``,
with kernels transposed because a Hugging Face linear weight is ``[out, in]``.

This module holds the naming and dict conversion; streaming a checkpoint onto a mesh lives in
``hf_load`` and sharded export in ``hf_export`` (both re-exported here under their old names).
"""

from __future__ import annotations

import dataclasses
import importlib
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import transformers
from flax import nnx, traverse_util
from huggingface_hub.errors import StrictDataclassError
from jax.sharding import AbstractMesh

from easytrain.errors import EasytrainError
from easytrain.listing import listed
from easytrain.models.attention import DType
from easytrain.models.families import SUPPORTED_MODEL_TYPES, ConfigError, check_rope_values
from easytrain.models.llama import LlamaForCausalLM
from easytrain.models.scan import unstack_layer_dicts

ParamPath = tuple[str | int, ...]
Shapes = Mapping[str, tuple[int, ...]]

WEIGHTS_NAME = "model.safetensors"
WEIGHTS_INDEX_NAME = "model.safetensors.index.json"
EMBEDDING_NAME = "model.embed_tokens.weight"
HEAD_NAME = "lm_head.weight"
# Non-persistent buffers some exporters still write; they are recomputed, never loaded.
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)
# Parameter leaf name -> (Hugging Face tensor suffix, stored transposed?).
_LEAVES = {
    "kernel": ("weight", True),
    "embedding": ("weight", False),
    "scale": ("weight", False),
    "bias": ("bias", False),
}
_PREVIEW = 8
# `shape_only_model`'s kept models by (config class, config JSON, dtype, param_dtype, scan_layers), oldest first.
_SHAPE_ONLY_MODELS: dict[tuple[str, str, str, str, bool], LlamaForCausalLM] = {}
_SHAPE_ONLY_KEPT = 8


class CheckpointError(EasytrainError, ValueError):
    """A checkpoint does not match the model its config describes."""


def hf_name(path: ParamPath) -> tuple[str, bool]:
    """Hugging Face tensor name of a parameter path, and whether it is transposed."""
    *modules, leaf = path
    if leaf not in _LEAVES or not modules:
        raise CheckpointError(f"parameter {_join(path)!r} has no Hugging Face equivalent.")
    suffix, transpose = _LEAVES[leaf]
    prefix = "" if modules[0] == "lm_head" else "model."
    return prefix + ".".join(str(m) for m in modules) + "." + suffix, transpose


def _join(path: ParamPath) -> str:
    return "/".join(str(p) for p in path)


def _abstract_model(
    config: transformers.PretrainedConfig, dtype: DType, param_dtype: DType, scan_layers: bool = False
) -> LlamaForCausalLM:
    """Shape-only model: the single source of truth for names and shapes."""

    def build() -> LlamaForCausalLM:
        return LlamaForCausalLM(config, dtype=dtype, param_dtype=param_dtype, rngs=nnx.Rngs(0),
                                scan_layers=scan_layers)

    # No mesh while shapes are taken, even inside `with jax.set_mesh(mesh):`: flax would otherwise turn the
    # logical axis names into shardings over that mesh, whose axes they are not (placement comes later).
    with nnx.use_eager_sharding(False), jax.sharding.use_abstract_mesh(AbstractMesh((), ())):
        return nnx.eval_shape(build)


def shape_only_model(config: transformers.PretrainedConfig, dtype: DType, param_dtype: DType,
                     scan_layers: bool = False) -> LlamaForCausalLM:
    """A copy of `_abstract_model`, which is built once per config, dtypes and layout: building it traces every
    initialiser (21-38 ms at two tiny layers), a load reads the layout and fills a model, and a trainer loads its
    policy, reference and initial weights from one config. The copy holds `config` itself, not the equal config of
    the call that built the kept model."""
    # the dtypes as given (`jnp.float32` or `np.dtype('float32')`): the model keeps them as static attributes
    key = (type(config).__qualname__, config.to_json_string(use_diff=False), repr(dtype), repr(param_dtype),
           scan_layers)
    if key not in _SHAPE_ONLY_MODELS:
        while len(_SHAPE_ONLY_MODELS) >= _SHAPE_ONLY_KEPT:
            _SHAPE_ONLY_MODELS.pop(next(iter(_SHAPE_ONLY_MODELS)))
        _SHAPE_ONLY_MODELS[key] = _abstract_model(config, dtype, param_dtype, scan_layers)
    model = nnx.clone(_SHAPE_ONLY_MODELS[key])
    model._config = dataclasses.replace(model._config, config=config)
    return model


def _expected_shapes(config: transformers.PretrainedConfig) -> dict[ParamPath, tuple[int, ...]]:
    model = shape_only_model(config, jnp.float32, jnp.float32)
    flat = traverse_util.flatten_dict(nnx.to_pure_dict(nnx.state(model, nnx.Param)))
    return {path: tuple(leaf.shape) for path, leaf in flat.items()}


def check_shapes(found: Shapes, expected: Shapes, what: str) -> None:
    """Raises one error listing every missing, unexpected and mis-shaped entry."""
    missing = sorted(expected.keys() - found.keys())
    unexpected = sorted(found.keys() - expected.keys())
    mismatched = [
        f"{name} {tuple(found[name])} != expected {expected[name]}"
        for name in sorted(expected.keys() & found.keys())
        if tuple(found[name]) != expected[name]
    ]
    if not (missing or unexpected or mismatched):
        return
    problems = [
        f"{label} ({len(items)}): {listed(items, _PREVIEW)}"
        for label, items in (("missing", missing), ("unexpected", unexpected), ("shape mismatch", mismatched))
        if items
    ]
    raise CheckpointError(
        f"{what} do not match the config. " + "; ".join(problems) + ". Check that the config "
        "(num_hidden_layers, hidden_size, intermediate_size, num_key_value_heads, head_dim, "
        "vocab_size, tie_word_embeddings, attention_bias, mlp_bias) describes these weights."
    )


def checked_params(params: dict, config: transformers.PretrainedConfig) -> dict[ParamPath, Any]:
    """Flattened parameters, after checking their names and shapes against the config (one error lists all)."""
    flat = traverse_util.flatten_dict(params)
    expected = {_join(path): shape for path, shape in _expected_shapes(config).items()}
    check_shapes({_join(path): np.shape(value) for path, value in flat.items()}, expected, "parameters")
    return flat


def to_hf_state_dict(params: dict, config: transformers.PretrainedConfig) -> dict[str, np.ndarray]:
    """Converts easytrain parameters to Hugging Face names and layouts.

    Args:
        params: ``nnx.to_pure_dict(nnx.state(model, nnx.Param))`` (decoder layers stacked or not).
        config: The config the parameters were built from.

    Returns:
        Contiguous numpy tensors keyed by Hugging Face name, in the parameters' dtype.
    """
    tensors = {}
    for path, value in checked_params(unstack_layer_dicts(params), config).items():
        name, transpose = hf_name(path)
        array = np.asarray(value)
        tensors[name] = np.ascontiguousarray(array.T if transpose else array)
    return tensors


def hf_layout(config: transformers.PretrainedConfig) -> dict[str, tuple[ParamPath, bool, tuple[int, ...]]]:
    """Every tensor the config implies: Hugging Face name -> (parameter path, transposed?, stored shape)."""
    layout = {}
    for path, shape in _expected_shapes(config).items():
        name, transpose = hf_name(path)
        layout[name] = (path, transpose, shape[::-1] if transpose else shape)
    return layout


class LoadableTensors(NamedTuple):
    """A checkpoint's stored tensors as the config reads them (``loadable_shapes``)."""

    #: Shapes left to check against ``hf_layout``, under the names it gives.
    shapes: dict[str, tuple[int, ...]]
    #: A stored lm_head was set aside as a possible copy of the tied embedding: ``check_tied_head`` must
    #: confirm that its values equal the embedding's.
    head_to_check: bool
    #: Layout name -> the stored name its tensor is read from, where the two differ.
    stored_as: dict[str, str]


def loadable_shapes(shapes: Shapes, config: transformers.PretrainedConfig) -> LoadableTensors:
    """Drops recomputed buffers and reads a tied lm_head as transformers does: a head repeating the stored
    embedding is set aside, and a head stored without the embedding is read as the embedding (transformers
    ties the embedding to it), so a checkpoint that keeps the shared matrix only as ``lm_head.weight`` loads."""
    kept = {name: tuple(shape) for name, shape in shapes.items() if not name.endswith(_IGNORED_SUFFIXES)}
    head = kept.get(HEAD_NAME)
    if not config.tie_word_embeddings or head is None:
        return LoadableTensors(kept, False, {})
    if EMBEDDING_NAME not in kept:
        kept[EMBEDDING_NAME] = kept.pop(HEAD_NAME)
        return LoadableTensors(kept, False, {EMBEDDING_NAME: HEAD_NAME})
    if head != kept[EMBEDDING_NAME]:
        return LoadableTensors(kept, False, {})  # reported as unexpected by check_shapes
    del kept[HEAD_NAME]
    return LoadableTensors(kept, True, {})


def check_tied_head(head: np.ndarray, embedding: np.ndarray) -> None:
    """A stored lm_head is accepted under tied embeddings only as an exact copy of them."""
    if not np.array_equal(head, embedding):
        raise CheckpointError(
            f"checkpoint tensors do not match the config. unexpected (1): {HEAD_NAME}: the config has "
            f"tie_word_embeddings=True but {HEAD_NAME} differs from {EMBEDDING_NAME}; set "
            "tie_word_embeddings=False in config.json if the head was trained separately."
        )


def from_hf_state_dict(tensors: Mapping[str, np.ndarray], config: transformers.PretrainedConfig) -> dict:
    """Converts Hugging Face tensors to an easytrain parameter pure dict.

    Args:
        tensors: Tensors keyed by Hugging Face name (e.g. a safetensors file's contents).
        config: Config describing the model the tensors belong to.

    Returns:
        Nested dict for ``nnx.replace_by_pure_dict``, arrays in the tensors' dtype.

    Raises:
        CheckpointError: Listing all missing, unexpected and mis-shaped tensors.
    """
    loadable = loadable_shapes({name: np.shape(t) for name, t in tensors.items()}, config)
    layout = hf_layout(config)
    check_shapes(loadable.shapes, {name: hf_shape for name, (_, _, hf_shape) in layout.items()},
                 "checkpoint tensors")
    if loadable.head_to_check:
        check_tied_head(np.asarray(tensors[HEAD_NAME]), np.asarray(tensors[EMBEDDING_NAME]))
    flat = {}
    for name, (path, transpose, _) in layout.items():
        array = np.asarray(tensors[loadable.stored_as.get(name, name)])
        flat[path] = array.T if transpose else array
    return traverse_util.unflatten_dict(flat)


def damaged_file(path: Path, error: Exception) -> CheckpointError:
    """The refusal of a file that cannot be read as what its name says, naming it: most often one cut short."""
    return CheckpointError(f"{path} cannot be read ({type(error).__name__}: {error}); the file is damaged or "
                           "incomplete (an interrupted download or copy?): fetch or copy it again.")


def read_json_object(path: Path) -> dict[str, Any]:
    """The JSON object ``path`` holds, or a `damaged_file` refusal naming it."""
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as error:  # JSONDecodeError, UnicodeDecodeError
        raise damaged_file(path, error) from error
    if not isinstance(value, dict):
        raise damaged_file(path, TypeError(f"it holds a JSON {type(value).__name__}, not an object"))
    return value


#: What `AutoConfig.from_pretrained` raises for a readable config.json whose values it refuses (its validators'
#: errors, a required RoPE key missing, a zero it divides by).
CONFIG_REFUSALS = (StrictDataclassError, ValueError, TypeError, KeyError, ArithmeticError)


def _read_config(directory: Path) -> transformers.PretrainedConfig:
    """Loads ``config.json``, rejecting architectures this model cannot represent."""
    path = directory / "config.json"
    if not path.is_file():
        raise CheckpointError(f"{path} not found; a checkpoint directory needs a config.json.")
    fields = read_json_object(path)
    model_type = fields.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise CheckpointError(
            f"{path} has model_type={model_type!r}; load_pretrained supports model_type in "
            f"{SUPPORTED_MODEL_TYPES}."
        )
    rope = fields.get("rope_parameters") or fields.get("rope_scaling")
    try:
        if isinstance(rope, dict):
            check_rope_values(rope)  # before transformers' own checks, which name no key
        return transformers.AutoConfig.from_pretrained(directory)
    except ConfigError as error:
        raise CheckpointError(f"{path}: {error} Fix the value in the file.") from error
    except CONFIG_REFUSALS as error:
        reason = (str(error).strip().splitlines() or [""])[-1].strip()
        raise CheckpointError(f"{path} holds values transformers refuses ({type(error).__name__}: {reason}); fix "
                              "them, or fetch the file again.") from error


# Loading and export live in their own modules; ``hf_io`` keeps exporting their names (PEP 562,
# so the modules that import from ``hf_io`` are not imported in a cycle).
_MOVED = {"from_pretrained": "hf_load", "load_pretrained": "hf_load", "save_pretrained": "hf_export"}


def __getattr__(name: str) -> Any:
    if name in _MOVED:
        return getattr(importlib.import_module(f"easytrain.models.{_MOVED[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
