"""Hugging Face checkpoints streamed straight into their sharded layout.

Names and shapes are checked against the config from the safetensors headers before any tensor data
is read. Then one tensor at a time, each device's slice is read from the file (only the rows or
columns that device holds), transposed to the easytrain layout, cast and placed, so the host never
holds more than about one tensor beyond what the devices keep.
"""

from __future__ import annotations

import copy
import dataclasses
import os
from collections import defaultdict
from pathlib import Path
from typing import Any

import huggingface_hub
import jax
import jax.numpy as jnp
import numpy as np
import transformers
from flax import nnx, traverse_util
from jax.sharding import Mesh
from safetensors import safe_open

from easytrain import sharding
from easytrain.models.attention import DType
from easytrain.models.narrowing import cast_overflowed, largest_finite, narrows, refuse_loaded
from easytrain.models.hf_io import (
    EMBEDDING_NAME,
    HEAD_NAME,
    WEIGHTS_INDEX_NAME,
    CheckpointError,
    LoadableTensors,
    ParamPath,
    _read_config,
    check_shapes,
    check_tied_head,
    hf_layout,
    loadable_shapes,
    read_json_object,
    shape_only_model,
)
from easytrain.models.llama import LlamaForCausalLM
from easytrain.models.scan import STACKED
from easytrain.models.shard_index import TensorEntry, read_headers
from easytrain.models.token_ids import file_fix, token_id_refusal

GENERATION_CONFIG_NAME = "generation_config.json"
#: Attribute of a loaded model that holds its checkpoint's generation config (`generation_config_of`).
_GENERATION_ATTRIBUTE = "_source_generation_config"

# What a hub download fetches: config, weights and tokenizer files, never PyTorch .bin duplicates.
HUB_PATTERNS = (
    "config.json",
    GENERATION_CONFIG_NAME,
    "*.safetensors",
    WEIGHTS_INDEX_NAME,
    "tokenizer*",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.*",
    "merges.txt",
    "*.model",
    "chat_template.*",
)
_FLOAT_DTYPES = {"F16": np.dtype(np.float16), "BF16": np.dtype(jnp.bfloat16), "F32": np.dtype(np.float32),
                 "F64": np.dtype(np.float64)}


@dataclasses.dataclass(frozen=True)
class _HeldGenerationConfig:
    """A checkpoint's generation config on the model it loaded; compared by its JSON, since NNX graph definitions
    (which hold the model's plain attributes) are jit cache keys."""

    key: str
    config: transformers.GenerationConfig = dataclasses.field(compare=False)


def resolve_checkpoint(path_or_name: str | os.PathLike) -> Path:
    """A local checkpoint directory, or the snapshot of a Hugging Face Hub model (cache first).

    Raises:
        CheckpointError: Not a directory and not downloadable (offline, no network, unknown name).
    """
    path = Path(path_or_name).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise CheckpointError(f"{path} is a file; pass the checkpoint directory that holds config.json.")
    try:
        huggingface_hub.utils.validate_repo_id(str(path_or_name))
    except huggingface_hub.errors.HFValidationError as error:
        raise CheckpointError(f"{str(path_or_name)!r} does not exist, and it is not a Hugging Face Hub id "
                              "(namespace/name) either; check the path, or pass a hub model id.") from error
    try:
        return Path(huggingface_hub.snapshot_download(str(path_or_name), allow_patterns=list(HUB_PATTERNS)))
    except (OSError, ValueError) as error:
        offline = " (HF_HUB_OFFLINE=1 is set: only models already in the cache resolve)" if os.environ.get(
            "HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on") else ""
        reason = str(error).strip().splitlines()[0].rstrip(".") if str(error).strip() else ""
        raise CheckpointError(
            f"{str(path_or_name)!r} is not a local directory and could not be fetched from the Hugging Face "
            f"Hub{offline}: {type(error).__name__}: {reason}. Pass the path of a local checkpoint directory "
            "(config.json + *.safetensors), e.g. one written by save_pretrained or huggingface-cli download."
        ) from error


def read_generation_config(path_or_name: str | os.PathLike, vocab_size: int | None = None
                           ) -> transformers.GenerationConfig | None:
    """The checkpoint's ``generation_config.json``, or None without one. Instruct checkpoints keep their extra
    EOS ids (end of turn) and sampling defaults only there, so an export must carry it, not rebuild it.
    `vocab_size`: the model's, which its token ids must lie under (default: ``config.json``'s, where it has one).

    Raises:
        CheckpointError: The file exists but is damaged (no JSON object), a token id field holds something other
            than token ids (`easytrain.models.token_ids`), or transformers refuses its values.
    """
    directory = resolve_checkpoint(path_or_name)
    if not (directory / GENERATION_CONFIG_NAME).is_file():
        return None
    if vocab_size is None and (directory / "config.json").is_file():
        vocab_size = read_json_object(directory / "config.json").get("vocab_size")
    # cut short, or no JSON object: a `damaged_file`
    _check_token_ids(directory / GENERATION_CONFIG_NAME, read_json_object(directory / GENERATION_CONFIG_NAME),
                     vocab_size, "; or delete it (an export then derives one from config.json)")
    try:
        return transformers.GenerationConfig.from_pretrained(directory)
    except (OSError, ValueError, TypeError) as error:
        raise CheckpointError(f"{directory / GENERATION_CONFIG_NAME} cannot be read ({error}); fix the file, or "
                              "delete it to export one derived from config.json.") from error


def _check_token_ids(path: Path, fields: dict[str, Any], vocab_size: Any, fix: str) -> None:
    """`token_ids.token_id_refusal` of the file `path` as a `CheckpointError`: transformers keeps `"x"`, 2.5, true,
    an EOS of -1 or one past the vocabulary without a word, and ``generate`` then fails far from the file, or never
    stops. `fix`: what else to do about the file."""
    vocab_size = vocab_size if isinstance(vocab_size, int) and not isinstance(vocab_size, bool) else None
    if refusal := token_id_refusal(str(path), fields, vocab_size, file_fix(path.name, fix)):
        raise CheckpointError(refusal)


def generation_config_of(model: Any) -> transformers.GenerationConfig | None:
    """The generation config of the checkpoint ``from_pretrained`` loaded ``model`` from (a copy), or None.
    ``generate`` takes its EOS ids as an argument: pass ``generation_config_of(model).eos_token_id`` to stop at
    every EOS of an instruct model."""
    held = getattr(model, _GENERATION_ATTRIBUTE, None)
    return copy.deepcopy(held.config) if held is not None else None


def _keep_generation_config(model: nnx.Module, generation_config: transformers.GenerationConfig | None) -> None:
    if generation_config is not None:
        setattr(model, _GENERATION_ATTRIBUTE, _HeldGenerationConfig(generation_config.to_json_string(),
                                                                     generation_config))


def _validate(entries: dict[str, TensorEntry], config: transformers.PretrainedConfig,
              layout: dict[str, tuple[ParamPath, bool, tuple[int, ...]]]) -> LoadableTensors:
    """Checks names, shapes and dtypes against `layout` (`hf_layout(config)`); returns which stored tensor each
    weight is read from, and whether a tied lm_head still needs its value check."""
    loadable = loadable_shapes({name: e.shape for name, e in entries.items()}, config)
    expected = {name: hf_shape for name, (_, _, hf_shape) in layout.items()}
    check_shapes(loadable.shapes, expected, "checkpoint tensors")
    stored = [loadable.stored_as.get(name, name) for name in loadable.shapes]
    if bad := sorted(f"{n} ({entries[n].dtype})" for n in stored if entries[n].dtype not in _FLOAT_DTYPES):
        raise CheckpointError(f"tensors with non-float dtypes cannot be loaded: {bad[:8]}; only "
                              f"{tuple(_FLOAT_DTYPES)} are supported (dequantise the checkpoint first).")
    return loadable


def _check_tied_head_values(entries: dict[str, TensorEntry]) -> None:
    """Reads the head and the embedding (two tensors) to confirm the head only repeats the embedding."""
    head, embedding = entries[HEAD_NAME], entries[EMBEDDING_NAME]
    with safe_open(head.file, framework="numpy") as handle:
        head_value = handle.get_tensor(HEAD_NAME)
    with safe_open(embedding.file, framework="numpy") as handle:
        check_tied_head(head_value, handle.get_tensor(EMBEDDING_NAME))


def _param_shardings(abstract_params: nnx.State, mesh: Mesh | None,
                     rules: sharding.LogicalRules | None) -> dict[ParamPath, jax.sharding.Sharding | None]:
    """The trainer's layout on ``mesh`` (same rules, same function); None: the default device."""
    if mesh is None:
        return dict.fromkeys(traverse_util.flatten_dict(nnx.to_pure_dict(abstract_params)))
    tree = sharding.param_shardings(abstract_params, mesh, rules if rules is not None else sharding.DEFAULT_RULES)
    return traverse_util.flatten_dict(tree)


def _place(name: str, view: Any, shape: tuple[int, ...], transpose: bool, target: jax.sharding.Sharding | None,
           dtype: np.dtype, peaks: dict[str, float]) -> jax.Array:
    """One parameter (stored as `name`) on its devices; each distinct slice is read from the file once. Where the
    cast to a narrower `dtype` made a value inf, its block's largest finite |value| goes to `peaks` (the refusal
    waits for every process's: `agreed_peaks`).

    Without a target the array is left uncommitted on the default device, as ``jnp.asarray`` would,
    so a later ``jit`` over a mesh may still move it.
    """
    blocks: dict[str, np.ndarray] = {}

    def read(index: tuple[slice, ...]) -> np.ndarray:
        key = repr(index)
        if key not in blocks:
            block = view[index[::-1] if transpose else index]
            with np.errstate(over="ignore"):  # refused below, by name
                blocks[key] = np.ascontiguousarray(block.T if transpose else block, dtype=dtype)
            if narrows(dtype, block.dtype) and cast_overflowed(blocks[key]):  # an inf, or one made now?
                peaks[name] = max(peaks.get(name, 0.0), float(largest_finite([(block, None)], list)[0]))
        return blocks[key]

    if target is None:
        return jax.device_put(read((slice(None),) * len(shape)))
    return jax.make_array_from_callback(shape, target, read)


def from_pretrained(
    path_or_name: str | os.PathLike,
    *,
    dtype: DType = jnp.float32,
    param_dtype: DType = jnp.float32,
    mesh: Mesh | None = None,
    rules: sharding.LogicalRules | None = None,
    scan_layers: bool = False,
) -> LlamaForCausalLM:
    """Builds a model from a Hugging Face checkpoint, loading each weight straight into its sharding.

    Args:
        path_or_name: A directory with ``config.json`` and ``model.safetensors`` (or a sharded index),
            or a Hugging Face Hub name, fetched with ``huggingface_hub.snapshot_download``.
        dtype: Compute dtype.
        param_dtype: Parameters are cast to this dtype as they are read.
        mesh: Place every parameter on this mesh by its logical axes; None: the default device.
        rules: Logical axis -> mesh axis table (default ``easytrain.sharding.DEFAULT_RULES``); pass
            the trainer's ``partition_rules`` so the loaded layout is the training layout.
        scan_layers: Return the decoder layers stacked (``LlamaForCausalLM.scan_layers``), each weight
            stacked as soon as its layers are read, so the devices never hold a second copy of every layer
            (setting ``scan_layers`` on the loaded model would, for a moment).

    Returns:
        The model with every parameter loaded; no random initialisation is run. It keeps the checkpoint's
        ``generation_config.json`` (``generation_config_of``), which ``save_pretrained`` writes back.

    Raises:
        CheckpointError: Unresolvable name, unsupported ``model_type``, no weights, or weights not
            matching the config (one error listing every missing, unexpected and mis-shaped tensor), an
            unreadable ``generation_config.json`` or one whose token ids are none (without one, such ids in
            ``config.json``, which an export would write there), a shard index naming a file
            outside the directory, a weight the cast to ``param_dtype`` makes inf, or a call inside a trace
            (``jax.jit``, a ``Frozen`` builder): load outside it and pass the module.

    Example:
        >>> mesh = easytrain.sharding.make_mesh(data=1, fsdp=-1)  # doctest: +SKIP
        >>> model = from_pretrained("path/to/llama", param_dtype=jnp.bfloat16, mesh=mesh)  # doctest: +SKIP
    """
    if _inside_trace():
        raise CheckpointError(
            f"from_pretrained({str(path_or_name)!r}) was called inside a trace (jax.jit, nnx.eval_shape, or a "
            "Frozen builder, which runs under jax.jit): every weight would become a constant of the compiled "
            "program. Load the model outside and pass the module instead: Frozen(from_pretrained(path, "
            "mesh=self.mesh, rules=self.partition_rules), checkpoint=False).")
    for field, value in (("dtype", dtype), ("param_dtype", param_dtype)):
        _check_float_dtype(field, value)
    directory = resolve_checkpoint(path_or_name)
    config = _read_config(directory)
    generation_config = read_generation_config(directory, config.vocab_size)
    if generation_config is None:  # an export derives generation_config.json from config.json's ids
        _check_token_ids(directory / "config.json", config.to_dict(), config.vocab_size, "")
    entries = read_headers(directory)
    layout = hf_layout(config)  # the check's and the reads' (built from a shape-only model: once)
    loadable = _validate(entries, config, layout)
    if loadable.head_to_check:
        _check_tied_head_values(entries)
    per_layer = shape_only_model(config, dtype, param_dtype)
    model = shape_only_model(config, dtype, param_dtype, scan_layers) if scan_layers else per_layer
    abstract_params = nnx.state(model, nnx.Param)
    targets = _param_shardings(nnx.state(per_layer, nnx.Param), mesh, rules)
    by_file: dict[Path, list[str]] = defaultdict(list)
    for name in layout:
        by_file[entries[loadable.stored_as.get(name, name)].file].append(name)
    flat, peaks, cast = {}, {}, _cast_dtype(param_dtype)
    for file, names in by_file.items():  # one open file at a time: its mapped pages are released on close
        with safe_open(file, framework="numpy") as handle:
            for name in names:
                path, transpose, _ = layout[name]
                stored = loadable.stored_as.get(name, name)
                shape = entries[stored].shape[::-1] if transpose else entries[stored].shape
                flat[path] = _place(stored, handle.get_slice(stored), shape, transpose, targets[path],
                                    cast, peaks)
    stored = [loadable.stored_as.get(name, name) for name in layout]
    if any(narrows(cast, _FLOAT_DTYPES[entries[name].dtype]) for name in stored):  # the same on every process
        refuse_loaded(peaks, stored, cast)  # for tensors any process read past the range
    if scan_layers:
        flat = _stack_layers(flat, _param_shardings(abstract_params, mesh, rules))
    nnx.replace_by_pure_dict(abstract_params, traverse_util.unflatten_dict(flat))
    nnx.update(model, abstract_params)
    _keep_generation_config(model, generation_config)  # save_pretrained writes it back
    return model


def _check_float_dtype(field: str, value: DType | str) -> None:
    """`value` names a floating dtype, or the load is refused naming `field`: an integer one would round every
    weight, and a name numpy does not know failed unnamed (as `dtype`, only at the model's first forward)."""
    try:
        dtype = jnp.dtype(value)
    except TypeError as error:  # 'bf16'
        raise CheckpointError(f"{field}={value!r} is not a dtype; use jnp.float32 or jnp.bfloat16 (or their names, "
                              "'float32', 'bfloat16').") from error
    if not jnp.issubdtype(dtype, jnp.floating):
        raise CheckpointError(f"{field}={value!r} is not a floating dtype: every weight would be rounded to "
                              f"{dtype.name}; use jnp.float32 or jnp.bfloat16 (quantised loading is not supported).")


def _cast_dtype(param_dtype: DType) -> np.dtype:
    """The dtype the parameters are held in: float64 is float32 unless x64 is on, and its range is float32's."""
    return np.dtype(jax.dtypes.canonicalize_dtype(param_dtype))


def _stack_layers(flat: dict[ParamPath, jax.Array], targets: dict[ParamPath, jax.sharding.Sharding | None]
                  ) -> dict[ParamPath, jax.Array]:
    """`flat`'s per-layer arrays (`layers.<i>.…`) stacked into `targets`' stacked leaves (`layers.stacked.…`),
    one weight at a time, each layer's arrays dropped as soon as they are stacked: the devices hold at most one
    stacked weight more than the model."""
    for path, target in targets.items():
        if STACKED not in path:
            continue
        at = path.index(STACKED)
        layers, index = [], 0
        while (layer_path := (*path[:at], index, *path[at + 1:])) in flat:
            layers.append(flat.pop(layer_path))
            index += 1
        flat[path] = (jax.jit(_stack, out_shardings=target) if target is not None else _stack)(*layers)
        del layers
    return flat


def _stack(*values: jax.Array) -> jax.Array:
    return jnp.stack(values)


def _inside_trace() -> bool:
    """Whether JAX is tracing here (under `jax.jit`, `jax.eval_shape`, ...): its arrays are then tracers."""
    return isinstance(jnp.zeros(()), jax.core.Tracer)


def load_pretrained(
    directory: str | os.PathLike,
    *,
    dtype: DType = jnp.float32,
    param_dtype: DType = jnp.float32,
) -> LlamaForCausalLM:
    """``from_pretrained`` onto the default device (the original single-device entry point)."""
    return from_pretrained(directory, dtype=dtype, param_dtype=param_dtype)
