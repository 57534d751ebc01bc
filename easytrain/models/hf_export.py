"""Export to a Hugging Face checkpoint directory, one shard file of tensors at a time.

Parameters may be sharded over many devices (and many processes): a shard file's tensors are fetched to the host
together (in transfers of at most 256 MiB), converted to the Hugging Face layout and dtype, and dropped once their
shard file is written, so the host never holds more than one shard file of tensors. Only process 0 writes.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import transformers
from flax import nnx
from huggingface_hub.serialization import split_state_dict_into_shards_factory
from jax.experimental import multihost_utils

from easytrain.models.attention import DType
from easytrain.models.families import exported_config
from easytrain.models.narrowing import largest_finite, narrows_value, refuse_narrowed
from easytrain.models.hf_io import (
    EMBEDDING_NAME,
    WEIGHTS_INDEX_NAME,
    WEIGHTS_NAME,
    HEAD_NAME,
    CheckpointError,
    checked_params,
    hf_name,
)
from easytrain.models.hf_load import generation_config_of
from easytrain.models.llama import LlamaForCausalLM
from easytrain.models.scan import unstack_layer_dicts
from easytrain.models.token_ids import attribute_fix, token_id_refusal
from easytrain.models.weight_files import write_safetensors

SHARD_PATTERN = "model{suffix}.safetensors"
_SHARD_FILE = re.compile(r"model-\d{5}-of-\d{5}\.safetensors")


@dataclasses.dataclass(frozen=True)
class _Planned:
    """One tensor to write: where its value is, and its stored layout."""

    value: Any
    transpose: bool
    dtype: np.dtype

    @property
    def nbytes(self) -> int:
        """Its bytes as written (what a shard file holds)."""
        return int(np.prod(np.shape(self.value), dtype=np.int64)) * self.dtype.itemsize

    @property
    def fetched_nbytes(self) -> int:
        """Its bytes as fetched, in the parameter's own dtype (float32 weights written in bfloat16 move twice their
        written bytes), which bound a transfer."""
        return int(np.prod(np.shape(self.value), dtype=np.int64)) * np.dtype(self.value.dtype).itemsize


@dataclasses.dataclass(frozen=True)
class _LayerSlice:
    """Layer `index` of a weight stored stacked (`easytrain.models.scan`), sliced only when it is written: one
    layer's tensor at a time is ever copied."""

    stacked: Any
    index: int

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.stacked.shape[1:])

    @property
    def dtype(self) -> Any:
        return self.stacked.dtype


def _params_of(model_or_params: LlamaForCausalLM | dict) -> dict:
    if isinstance(model_or_params, nnx.Module):
        if nnx.state(model_or_params, nnx.LoRAParam):
            raise CheckpointError("the model has LoRA adapters, which have no transformers name; export "
                                  "easytrain.lora.merge_lora(model), or save the adapters with "
                                  "easytrain.models.peft_io.save_peft_adapter.")
        return nnx.to_pure_dict(nnx.state(model_or_params, nnx.Param))
    return model_or_params


#: The storage dtypes an export is written in: transformers cannot load float8 tensors, and float64 only doubles
#: the files of weights trained in float32 at most.
EXPORT_DTYPES = ("float32", "bfloat16", "float16")


def _storage_dtype(dtype: DType | str | None, value: Any, name: str = "") -> np.dtype:
    """The dtype `name` is written in: `dtype`, or with None its parameter's; one of `EXPORT_DTYPES`."""
    accepted = "use 'float32', 'bfloat16' or 'float16', or None to keep each parameter's dtype"
    try:
        stored = jnp.dtype(dtype) if dtype is not None else jnp.dtype(value.dtype)
    except TypeError as error:  # e.g. 'bf16': numpy names no such dtype
        raise CheckpointError(f"dtype={dtype!r} is not a dtype; {accepted}.") from error
    if stored.name in EXPORT_DTYPES:
        return stored
    if dtype is None:
        raise CheckpointError(f"dtype=None keeps each parameter's dtype, but {name or 'a parameter'} is {stored.name}, "
                              "not an export dtype; pass dtype='float32', 'bfloat16' or 'float16'.")
    raise CheckpointError(f"dtype={dtype!r} ({stored.name}) is not an export dtype (transformers cannot load float8 "
                          f"tensors; float64 only doubles the files); {accepted}.")


# Within a decoder layer, transformers registers its modules (and so saves their tensors) in this order.
_LAYER_MODULES = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "self_attn.q_norm",
                  "self_attn.k_norm", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj", "input_layernorm",
                  "post_attention_layernorm")
_LAYER_TENSOR = re.compile(r"model\.layers\.(\d+)\.(.+)\.(weight|bias)")
_OUTSIDE_LAYERS = {EMBEDDING_NAME: 0, "model.norm.weight": 2, HEAD_NAME: 3}


def _module_order(name: str) -> tuple:
    """Sort key putting tensors in transformers' ``state_dict`` order: embedding, layers in turn (each module's
    weight before its bias), final norm, head. The shard split is greedy in this order, so it decides which
    tensors share a file; a name outside the table goes after the known ones (by name), never fails the export."""
    if name in _OUTSIDE_LAYERS:
        return (_OUTSIDE_LAYERS[name],)
    match = _LAYER_TENSOR.fullmatch(name)
    if match is None:
        return (4, name)
    layer, module, leaf = match.groups()
    rank = _LAYER_MODULES.index(module) if module in _LAYER_MODULES else len(_LAYER_MODULES)
    return (1, int(layer), rank, module, leaf == "bias")


def export_plan(params: dict, config: transformers.PretrainedConfig, dtype: DType | str | None) -> dict[str, _Planned]:
    """Hugging Face name -> tensor to write, in transformers' save order, checked against the config from shapes
    alone."""
    plan = {}
    for path, value in checked_params(unstack_layer_dicts(params, _LayerSlice), config).items():
        name, transpose = hf_name(path)
        plan[name] = _Planned(value, transpose, _storage_dtype(dtype, value, name))
    return dict(sorted(plan.items(), key=lambda item: _module_order(item[0])))


def _check_range(plan: dict[str, _Planned]) -> None:
    """`narrowing.refuse_narrowed` over the tensors written in a dtype of smaller range than their own (float32
    to bfloat16 or float16, bfloat16 to float16, float64 to any), before any file is written: one reduction per
    parameter on its devices (a stacked weight's gives every layer's peak), the peaks agreed over processes, so
    that every process refuses alike."""
    arrays: dict[int, tuple[Any, tuple[int, ...] | None]] = {}  # id -> (parameter, axes reduced)
    taken: dict[str, tuple[int, int | None]] = {}  # name -> (its parameter's id, its layer)
    for name, planned in plan.items():
        value = planned.value
        if not narrows_value(planned.dtype, value):
            continue
        if isinstance(value, _LayerSlice):
            arrays.setdefault(id(value.stacked), (value.stacked, tuple(range(1, value.stacked.ndim))))
            taken[name] = (id(value.stacked), value.index)
        else:
            arrays[id(value)] = (value, None)
            taken[name] = (id(value), None)
    if not arrays:  # nothing narrowed: no transfer (an export asks once per shard file, nothing more)
        return
    peaks = dict(zip(arrays, largest_finite(list(arrays.values()), _to_host)))  # collective on every process
    local = {name: peaks[key] if layer is None else peaks[key][layer] for name, (key, layer) in taken.items()}
    refuse_narrowed(local, list(taken), {name: plan[name].dtype for name in taken}, "the export", "dtype")


def generation_config_to_write(config: transformers.PretrainedConfig,
                                generation_config: transformers.GenerationConfig | None
                                ) -> transformers.GenerationConfig:
    """The ``generation_config.json`` an export writes, refused before any file where ``from_pretrained`` would
    refuse it (`token_ids.token_id_refusal`): the one given, else one derived from the config's ids."""
    given = generation_config is not None
    if not given:
        generation_config = transformers.GenerationConfig.from_model_config(config)
    source = "generation_config" if given else "config (written to generation_config.json)"
    fix = attribute_fix("generation_config" if given else "config")
    if refusal := token_id_refusal(source, generation_config.to_dict(), config.vocab_size, fix):
        raise CheckpointError(refusal)
    return generation_config


def _local_blocks(value: jax.Array) -> list[tuple[Any, jax.Array]]:
    """The distinct blocks of an array this process holds whole (replicas hold the same block), each a new array
    object over its device buffer. Fetching a ``jax.Array`` keeps the host copy on the object fetched wherever it is
    a copy (on a GPU), and a shard's ``data`` is the parameter's own object (a one-device parameter's, the parameter
    itself): fetched as it is, the host would keep every tensor it exported for as long as the model lives."""
    blocks: dict[str, tuple[Any, jax.Array]] = {}
    for shard in value.addressable_shards:
        blocks.setdefault(repr(shard.index), (shard.index, shard.data))
    return [(index, jax.make_array_from_single_device_arrays(data.shape, data.sharding, [data]))
            for index, data in blocks.values()]


def _to_host(values: list[Any]) -> list[np.ndarray]:
    """Every value whole on this host. The blocks this process holds are asked for in one ``jax.device_get`` (on a
    GPU one blocking copy per tensor waits for each in turn); an array spanning processes is gathered, a collective
    every process calls in the same order. A block holding its whole array is that array's host copy; others are
    copied into one and dropped as they are, so the host holds the fetched bytes about once."""
    local = [isinstance(value, jax.Array) and value.is_fully_addressable for value in values]
    blocks = [_local_blocks(value) if whole else [] for value, whole in zip(values, local)]
    fetched = jax.device_get([data for group in blocks for _, data in group])[::-1]  # popped in order
    hosts = []
    for value, whole, group in zip(values, local, blocks):
        if not isinstance(value, jax.Array):
            hosts.append(np.asarray(value))
        elif not whole:
            hosts.append(np.asarray(multihost_utils.process_allgather(value, tiled=True)))
        elif len(group) == 1 and group[0][1].shape == value.shape:
            hosts.append(fetched.pop())
        else:
            host = np.empty(value.shape, value.dtype)
            for index, _ in group:
                host[index] = fetched.pop()
            hosts.append(host)
    return hosts


#: The most bytes of tensors asked for in one transfer, in the parameters' own dtypes: a stacked weight's layers are
#: sliced on the device first, so a group costs as much device memory again.
_FETCH_GROUP_BYTES = 256 * 2**20


def _groups(names: list[str], plan: dict[str, _Planned]) -> list[list[str]]:
    """`names` in order, in runs of at most `_FETCH_GROUP_BYTES` fetched (a larger tensor alone)."""
    groups: list[list[str]] = []
    size = 0
    for name in names:
        if not groups or size + plan[name].fetched_nbytes > _FETCH_GROUP_BYTES:
            groups.append([])
            size = 0
        groups[-1].append(name)
        size += plan[name].fetched_nbytes
    return groups


def _fetch(names: list[str], plan: dict[str, _Planned]) -> dict[str, np.ndarray]:
    """The tensors `names` on the host, in their stored layout and dtype, fetched a group at a time."""
    tensors = {}
    for group in _groups(names, plan):
        values = [plan[name].value for name in group]
        arrays = _to_host([v.stacked[v.index] if isinstance(v, _LayerSlice) else v for v in values])[::-1]
        for name in group:  # each fetched array dropped once converted
            planned, array = plan[name], arrays.pop()
            tensors[name] = np.ascontiguousarray(array.T if planned.transpose else array, dtype=planned.dtype)
        del array
    return tensors


def _split(plan: dict[str, _Planned], max_shard_size: int | str) -> Any:
    """Shard files exactly as transformers names and fills them: greedy, in the plan's order, which is
    transformers' ``state_dict`` order (`_module_order`)."""
    if isinstance(max_shard_size, bool) or (isinstance(max_shard_size, int) and max_shard_size <= 0):
        raise CheckpointError(f"max_shard_size={max_shard_size!r} must be a positive number of bytes or a "
                              "string like '200MB' or '5GB'.")
    try:
        return split_state_dict_into_shards_factory(plan, get_storage_size=lambda p: p.nbytes,
                                                    filename_pattern=SHARD_PATTERN, max_shard_size=max_shard_size)
    except (ValueError, TypeError, AttributeError) as error:
        raise CheckpointError(f"max_shard_size={max_shard_size!r} is not a size ({error}); use an int of bytes "
                              "or a string like '200MB' or '5GB'.") from error


#: The subdirectory a LoRA run's export writes its PEFT adapter into (`easytrain.trainers.adapters`): a merged export
#: next to it stays loadable by `transformers` without PEFT taking over (it takes a directory with
#: `adapter_config.json` for an adapter).
ADAPTER_DIRNAME = "adapter"
#: The configs a merged export writes beside its weights.
_MODEL_CONFIGS = ("config.json", "generation_config.json")


def _is_weight_file(file: Path) -> bool:
    name = file.name
    return (name in (WEIGHTS_NAME, WEIGHTS_INDEX_NAME) or bool(_SHARD_FILE.fullmatch(name))) and file.is_file()


def _remove_stale_weights(directory: Path, keep: set[str]) -> None:
    """Weight files of an earlier save that this one does not overwrite would shadow or confuse loaders."""
    for file in directory.iterdir():
        if _is_weight_file(file) and file.name not in keep:
            file.unlink()


def remove_earlier_adapter(directory: Path) -> None:
    """A model exported into `directory`: an earlier LoRA export's adapter there (`adapter/` holding PEFT's
    adapter_config.json, as a whole) would pass for this model's. An `adapter/` that is no PEFT adapter stays."""
    from easytrain.models.peft_config import ADAPTER_CONFIG_NAME  # via easytrain.lora, it imports this package

    adapter = directory / ADAPTER_DIRNAME
    if (adapter / ADAPTER_CONFIG_NAME).is_file():
        shutil.rmtree(adapter)


def remove_earlier_model(directory: Path) -> None:
    """An adapter alone exported into `directory`: an earlier merged export there (its weight files, and with them
    its config.json and generation_config.json) would load as the model instead of base + adapter. A config.json
    with no weight file beside it is no export's and stays; so do tokenizer files (no weights)."""
    if not directory.is_dir() or not any(_is_weight_file(file) for file in directory.iterdir()):
        return
    _remove_stale_weights(directory, keep=set())
    for name in _MODEL_CONFIGS:
        if (directory / name).is_file():
            (directory / name).unlink()


def causal_lm_architecture(config: transformers.PretrainedConfig) -> str:
    """transformers' causal-LM class of the config's family, named as its config class is (``Qwen2Config`` ->
    ``Qwen2ForCausalLM``); transformers' own name table imports torch."""
    return type(config).__name__.removesuffix("Config") + "ForCausalLM"


def _write_configs(directory: Path, config: transformers.PretrainedConfig, dtype: np.dtype,
                   generation_config: transformers.GenerationConfig) -> None:
    config = exported_config(config)  # a copy, without fields transformers would read as another model
    config.dtype = str(dtype)  # transformers reads the storage dtype from here
    if not config.architectures:  # a config built rather than loaded: serving stacks (vLLM, TGI) read this field
        config.architectures = [causal_lm_architecture(config)]
    config.save_pretrained(directory)
    generation_config.save_pretrained(directory)


def _write_index(directory: Path, split: Any, plan: dict[str, _Planned]) -> None:
    total_parameters = sum(int(np.prod(np.shape(p.value), dtype=np.int64)) for p in plan.values())
    index = {"metadata": {"total_parameters": total_parameters, **split.metadata},
             "weight_map": split.tensor_to_filename}
    (directory / WEIGHTS_INDEX_NAME).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")


def save_pretrained(
    directory: str | os.PathLike,
    model_or_params: LlamaForCausalLM | dict,
    config: transformers.PretrainedConfig,
    *,
    dtype: DType | str | None = None,
    tokenizer: Any = None,
    max_shard_size: int | str = "5GB",
    generation_config: transformers.GenerationConfig | None = None,
) -> Path:
    """Writes a Hugging Face checkpoint directory that ``transformers`` loads as is.

    In a multi-process run every process must call this (arrays that span processes are gathered
    collectively); only process 0 writes.

    Args:
        directory: Created if needed; gets ``config.json``, ``generation_config.json`` and either
            ``model.safetensors`` or ``model-0000i-of-0000n.safetensors`` plus
            ``model.safetensors.index.json``. Weight files of an earlier save are replaced, and an earlier LoRA
            export's PEFT ``adapter/`` (one holding ``adapter_config.json``) is removed.
        model_or_params: A model, or its ``nnx.Param`` pure dict; arrays may be sharded.
        config: The model's config; written with the storage ``dtype`` recorded, and ``architectures`` set to the
            family's class (``Qwen2ForCausalLM``) when the config has none.
        dtype: Storage dtype (e.g. ``"bfloat16"``); default keeps each parameter's dtype. A dtype of smaller
            range than a parameter's refuses weights the cast would write as inf (float16: |value| >= 65520;
            bfloat16: about 3.396e38) before writing anything.
        tokenizer: Anything with ``save_pretrained(directory)`` (chat template included); saved alongside.
        max_shard_size: Largest shard file, in bytes or as ``"200MB"``/``"5GB"``; a single tensor
            larger than this gets a file of its own, as in transformers.
        generation_config: Written as ``generation_config.json``; default: the one of the checkpoint
            ``from_pretrained`` loaded the model from, unchanged (instruct models keep their extra EOS ids and
            sampling defaults only there), else one derived from the config's ``bos/eos/pad_token_id``. Its
            token ids are held to the load's rule (`easytrain.models.token_ids`) before any file is written.

    Returns:
        ``directory``.

    Example:
        >>> save_pretrained("export", model, model.config, dtype="bfloat16", max_shard_size="2GB")  # doctest: +SKIP
    """
    if generation_config is None:
        generation_config = generation_config_of(model_or_params)
    generation_config = generation_config_to_write(config, generation_config)
    plan = export_plan(_params_of(model_or_params), config, dtype)
    _check_range(plan)
    split = _split(plan, max_shard_size)
    directory, writer = Path(directory), jax.process_index() == 0
    if writer:
        directory.mkdir(parents=True, exist_ok=True)
        _remove_stale_weights(directory, keep=set(split.filename_to_tensors))
        remove_earlier_adapter(directory)
        _write_configs(directory, config, plan[EMBEDDING_NAME].dtype, generation_config)
    for filename, names in split.filename_to_tensors.items():
        tensors = _fetch(names, plan)  # every process: gathers are collective
        if writer:
            write_safetensors(tensors, directory / filename, metadata={"format": "pt"})
        del tensors
    if writer and split.is_sharded:
        _write_index(directory, split, plan)
    if writer and tokenizer is not None:
        tokenizer.save_pretrained(directory)
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices("easytrain:save_pretrained")  # files exist when any process returns
    return directory
