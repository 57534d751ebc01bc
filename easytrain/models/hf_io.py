"""Hugging Face checkpoints (``config.json`` + safetensors) in and out of easytrain.

Tensors travel as numpy arrays (bfloat16 through ml_dtypes), so easytrain never
needs torch at runtime. Parameter paths map to Hugging Face names by rule:
``layers/0/self_attn/q_proj/kernel`` <-> ``model.layers.0.self_attn.q_proj.weight``,
with kernels transposed because a Hugging Face linear weight is ``[out, in]``.
"""

from __future__ import annotations

import copy
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import transformers
from flax import nnx, traverse_util
from safetensors.numpy import load_file, save_file

from easytrain.errors import EasytrainError
from easytrain.models.llama import DType, LlamaForCausalLM

ParamPath = tuple[str | int, ...]
Shapes = Mapping[str, tuple[int, ...]]

SUPPORTED_MODEL_TYPES = ("llama",)
WEIGHTS_NAME = "model.safetensors"
WEIGHTS_INDEX_NAME = "model.safetensors.index.json"
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
    config: transformers.PretrainedConfig, dtype: DType, param_dtype: DType
) -> LlamaForCausalLM:
    """Shape-only model: the single source of truth for names and shapes."""

    def build() -> LlamaForCausalLM:
        return LlamaForCausalLM(config, dtype=dtype, param_dtype=param_dtype, rngs=nnx.Rngs(0))

    with nnx.use_eager_sharding(False):
        return nnx.eval_shape(build)


def _expected_shapes(config: transformers.PretrainedConfig) -> dict[ParamPath, tuple[int, ...]]:
    model = _abstract_model(config, jnp.float32, jnp.float32)
    flat = traverse_util.flatten_dict(nnx.to_pure_dict(nnx.state(model, nnx.Param)))
    return {path: tuple(leaf.shape) for path, leaf in flat.items()}


def _preview(names: list[str]) -> str:
    shown = ", ".join(names[:_PREVIEW])
    return shown + (f", ... ({len(names) - _PREVIEW} more)" if len(names) > _PREVIEW else "")


def _check_keys(found: Shapes, expected: Shapes, what: str) -> None:
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
        f"{label} ({len(items)}): {_preview(items)}"
        for label, items in (("missing", missing), ("unexpected", unexpected), ("shape mismatch", mismatched))
        if items
    ]
    raise CheckpointError(
        f"{what} do not match the config. " + "; ".join(problems) + ". Check that the config "
        "(num_hidden_layers, hidden_size, intermediate_size, num_key_value_heads, head_dim, "
        "vocab_size, tie_word_embeddings, attention_bias, mlp_bias) describes these weights."
    )


def to_hf_state_dict(params: dict, config: transformers.PretrainedConfig) -> dict[str, np.ndarray]:
    """Converts easytrain parameters to Hugging Face names and layouts.

    Args:
        params: ``nnx.to_pure_dict(nnx.state(model, nnx.Param))``.
        config: The config the parameters were built from.

    Returns:
        Contiguous numpy tensors keyed by Hugging Face name, in the parameters' dtype.
    """
    flat = traverse_util.flatten_dict(params)
    expected = {_join(path): shape for path, shape in _expected_shapes(config).items()}
    _check_keys({_join(path): np.shape(value) for path, value in flat.items()}, expected, "parameters")
    tensors = {}
    for path, value in flat.items():
        name, transpose = hf_name(path)
        array = np.asarray(value)
        tensors[name] = np.ascontiguousarray(array.T if transpose else array)
    return tensors


def _drop_ignorable(
    tensors: Mapping[str, np.ndarray], config: transformers.PretrainedConfig
) -> dict[str, np.ndarray]:
    """Removes recomputed buffers, and an lm_head that merely repeats tied embeddings."""
    kept = {name: t for name, t in tensors.items() if not name.endswith(_IGNORED_SUFFIXES)}
    head, embedding = kept.get("lm_head.weight"), kept.get("model.embed_tokens.weight")
    if config.tie_word_embeddings and head is not None and embedding is not None:
        if np.shape(head) == np.shape(embedding) and np.array_equal(head, embedding):
            del kept["lm_head.weight"]
    return kept


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
    tensors = _drop_ignorable(tensors, config)
    layout = {}
    for path, shape in _expected_shapes(config).items():
        name, transpose = hf_name(path)
        layout[name] = (path, transpose, shape[::-1] if transpose else shape)
    expected = {name: hf_shape for name, (_, _, hf_shape) in layout.items()}
    _check_keys({name: np.shape(t) for name, t in tensors.items()}, expected, "checkpoint tensors")
    flat = {}
    for name, (path, transpose, _) in layout.items():
        array = np.asarray(tensors[name])
        flat[path] = array.T if transpose else array
    return traverse_util.unflatten_dict(flat)


def _params_of(model_or_params: LlamaForCausalLM | dict) -> dict:
    if isinstance(model_or_params, nnx.Module):
        return nnx.to_pure_dict(nnx.state(model_or_params, nnx.Param))
    return model_or_params


def save_pretrained(
    directory: str | os.PathLike,
    model_or_params: LlamaForCausalLM | dict,
    config: transformers.PretrainedConfig,
    *,
    dtype: DType | str | None = None,
    tokenizer: Any = None,
) -> None:
    """Writes a Hugging Face checkpoint directory.

    Args:
        directory: Created if needed; gets ``config.json`` and ``model.safetensors``.
        model_or_params: A model, or its ``nnx.Param`` pure dict.
        config: The model's config; written with ``dtype`` recorded.
        dtype: Storage dtype of the saved tensors (e.g. ``jnp.bfloat16``); default keeps the params' dtype.
        tokenizer: Anything with ``save_pretrained(directory)``; saved alongside when given.
    """
    tensors = to_hf_state_dict(_params_of(model_or_params), config)
    if dtype is not None:
        tensors = {name: t.astype(jnp.dtype(dtype)) for name, t in tensors.items()}
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    config = copy.deepcopy(config)
    config.dtype = str(tensors["model.embed_tokens.weight"].dtype)
    config.save_pretrained(directory)
    save_file(tensors, directory / WEIGHTS_NAME, metadata={"format": "pt"})
    if tokenizer is not None:
        tokenizer.save_pretrained(directory)


def _read_config(directory: Path) -> transformers.PretrainedConfig:
    """Loads ``config.json``, rejecting architectures this model cannot represent."""
    path = directory / "config.json"
    if not path.is_file():
        raise CheckpointError(f"{path} not found; a checkpoint directory needs a config.json.")
    model_type = json.loads(path.read_text()).get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise CheckpointError(
            f"{path} has model_type={model_type!r}; load_pretrained supports model_type in "
            f"{SUPPORTED_MODEL_TYPES}."
        )
    return transformers.AutoConfig.from_pretrained(directory)


def _read_tensors(directory: Path) -> dict[str, np.ndarray]:
    """Reads a single safetensors file or every shard named by the index."""
    if (directory / WEIGHTS_NAME).is_file():
        return load_file(directory / WEIGHTS_NAME)
    index_path = directory / WEIGHTS_INDEX_NAME
    if not index_path.is_file():
        raise CheckpointError(
            f"no {WEIGHTS_NAME} or {WEIGHTS_INDEX_NAME} in {directory}; only safetensors "
            "checkpoints are supported (re-save other formats as safetensors)."
        )
    shards = sorted(set(json.loads(index_path.read_text())["weight_map"].values()))
    tensors: dict[str, np.ndarray] = {}
    for shard in shards:
        tensors.update(load_file(directory / shard))
    return tensors


def load_pretrained(
    directory: str | os.PathLike,
    *,
    dtype: DType = jnp.float32,
    param_dtype: DType = jnp.float32,
) -> LlamaForCausalLM:
    """Builds a model from a Hugging Face checkpoint directory.

    Args:
        directory: Holds ``config.json`` and ``model.safetensors`` (or a sharded index).
        dtype: Compute dtype.
        param_dtype: Parameters are cast to this dtype on load.

    Returns:
        The model with every parameter loaded; no random initialisation is run.

    Raises:
        CheckpointError: Unsupported ``model_type``, no weights, or weights not matching the config.
    """
    directory = Path(directory)
    config = _read_config(directory)
    params = from_hf_state_dict(_read_tensors(directory), config)
    model = _abstract_model(config, dtype, param_dtype)
    state = nnx.state(model, nnx.Param)
    nnx.replace_by_pure_dict(state, jax.tree.map(lambda a: jnp.asarray(a, dtype=param_dtype), params))
    nnx.update(model, state)
    return model
