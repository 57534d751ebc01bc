"""LoRA adapters in Hugging Face PEFT's format: ``adapter_config.json`` + ``adapter_model.safetensors``.

``save_peft_adapter`` writes what ``peft.PeftModel.from_pretrained(base_model, directory)`` loads onto the
transformers model easytrain's weights came from; ``load_peft_adapter`` puts an adapter trained with PEFT
(or by easytrain) onto an easytrain model. Tensor names are PEFT's::

    base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight   [r, in]   = lora_a.T
    base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight   [out, r]  = lora_b.T
    base_model.model.model.embed_tokens.weight                       (a module in modules_to_save)

Like the rest of easytrain this needs no torch: tensors travel as numpy arrays.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils
from safetensors import SafetensorError, safe_open

from easytrain import lora
from easytrain.listing import listed
from easytrain.lora import EMBEDDING_MODULES, LoRAConfig, LoRADense
from easytrain.models.narrowing import largest_finite, narrows_value, refuse_narrowed
from easytrain.models.hf_export import _storage_dtype, _to_host
from easytrain.models.hf_io import EMBEDDING_NAME, HEAD_NAME, CheckpointError, damaged_file, hf_name
from easytrain.models.layers import RMSNorm
from easytrain.models.peft_config import ADAPTER_CONFIG_NAME, ADAPTER_WEIGHTS_NAME, read_peft_config
from easytrain.models.scan import layers_unstacked, per_layer_view
from easytrain.models.weight_files import write_safetensors

PEFT_PREFIX = "base_model.model."
#: safetensors metadata key holding ``easytrain.lora.base_fingerprint`` of the base the adapter was saved on.
FINGERPRINT_KEY = "easytrain_base_fingerprint"

def _modules_to_save(model: nnx.Module, config: LoRAConfig) -> list[str]:
    """PEFT ``modules_to_save`` names of what ``config`` fully trains besides the adapters."""
    names = []
    for path, node in nnx.iter_modules(model):
        if not path or isinstance(node, LoRADense):
            continue
        leaf = str(path[-1])
        embedding = config.train_embeddings and leaf in ("embed_tokens", "lm_head")
        norm = config.train_norms and isinstance(node, RMSNorm)
        if embedding or norm:
            names.append(leaf)
    return sorted(set(names))


def _peft_config(model: nnx.Module, config: LoRAConfig, base_model_name_or_path: str | None) -> dict[str, Any]:
    targets = config.target_modules if isinstance(config.target_modules, str) else list(config.target_modules)
    modules_to_save = _modules_to_save(model, config)
    tied = _tied(model)
    peft = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model_name_or_path,
        "revision": None,
        "inference_mode": True,
        "r": config.rank,
        "lora_alpha": config.alpha,
        "lora_dropout": config.dropout,
        "target_modules": targets,
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": config.use_rslora,
        "use_dora": False,
        "init_lora_weights": True if config.init_a == "kaiming_uniform" else "gaussian",
        "modules_to_save": modules_to_save or None,
        "layers_to_transform": None,
        "layers_pattern": None,
        "rank_pattern": {},
        "alpha_pattern": {},
    }
    if tied and "embed_tokens" in modules_to_save:
        peft["ensure_weight_tying"] = True  # the trained embedding is also the output head, as in easytrain
    return peft


def _check_modules(modules: dict[str, LoRADense], config: LoRAConfig) -> None:
    if not modules:
        raise CheckpointError("the model has no adapters; call easytrain.lora.apply_lora before saving an adapter.")
    odd = sorted(name for name, m in modules.items() if m.rank != config.rank or
                 not np.isclose(m.scaling, config.scaling))
    if odd:
        raise CheckpointError(f"adapters of {odd[:4]} do not have config's rank={config.rank} and scaling="
                              f"{config.scaling:g}; pass the LoRAConfig the adapters were made with.")
    if config.train_embeddings and (both := sorted(n for n in modules if n.rsplit(".", 1)[-1] in EMBEDDING_MODULES)):
        raise CheckpointError(f"{both} have adapters and are trained in full (train_embeddings); PEFT adapts no module "
                              "its modules_to_save names, so it cannot hold both. Adapt the model with "
                              "easytrain.lora.apply_lora (which leaves them unadapted), or export the merged model "
                              "(merge_lora, then save_pretrained).")
    if unmatched := sorted(n for n in modules if not lora.matches(n, config.target_modules)):
        raise CheckpointError(f"adapted modules {unmatched[:4]} are not matched by config.target_modules="
                              f"{config.target_modules!r}; PEFT would not adapt them. Pass the config the "
                              "adapters were made with.")


def _planned_tensors(model: nnx.Module, config: LoRAConfig) -> dict[str, tuple[Any, bool]]:
    """PEFT tensor name -> (value, transpose?) for the adapters and the fully trained modules."""
    planned: dict[str, tuple[Any, bool]] = {}
    for name, module in lora.lora_modules(model).items():
        planned[f"{PEFT_PREFIX}{name}.lora_A.weight"] = (module.lora_a.get_value(), True)
        planned[f"{PEFT_PREFIX}{name}.lora_B.weight"] = (module.lora_b.get_value(), True)
    extra = nnx.state(model, nnx.All(lora.lora_trainable(config), nnx.Not(nnx.LoRAParam)))
    for path, variable in nnx.to_flat_state(extra):
        tensor, transpose = hf_name(path)
        planned[PEFT_PREFIX + tensor] = (variable.get_value(), transpose)
    if _tied(model) and PEFT_PREFIX + EMBEDDING_NAME in planned:  # PEFT's ensure_weight_tying stores the head too
        planned[PEFT_PREFIX + HEAD_NAME] = planned[PEFT_PREFIX + EMBEDDING_NAME]
    return planned


def _tied(model: nnx.Module) -> bool:
    return bool(getattr(getattr(model, "config", None), "tie_word_embeddings", False))


def save_peft_adapter(
    directory: str | os.PathLike,
    model: nnx.Module,
    config: LoRAConfig,
    base_model_name_or_path: str | None = None,
    *,
    dtype: Any = None,
    fingerprint: bool = True,
) -> Path:
    """Writes the model's adapters as a PEFT LoRA adapter directory.

    ``peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), directory)`` then computes
    what the easytrain model does. Embeddings/norms that ``config`` trains are saved whole, as PEFT's
    ``modules_to_save``. In a multi-process run every process must call this; only process 0 writes.

    Args:
        directory: Created if needed; gets ``adapter_config.json`` and ``adapter_model.safetensors``.
        model: A model with adapters (``easytrain.lora.apply_lora``); arrays may be sharded.
        config: The ``LoRAConfig`` the adapters were made with.
        base_model_name_or_path: Recorded in ``adapter_config.json`` (a Hub name or a path).
        dtype: Storage dtype of the tensors (e.g. ``"bfloat16"``); default keeps each one's dtype. A dtype of
            smaller range than a tensor's (``"float16"``, ``"bfloat16"`` of float32) refuses values the cast would
            write as inf before writing anything.
        fingerprint: Also record ``easytrain.lora.base_fingerprint`` of the frozen base weights in the
            safetensors metadata (PEFT ignores it), for ``load_peft_adapter(..., verify_base=True)``.

    Returns:
        ``directory``.
    """
    model = per_layer_view(model)  # PEFT names tensors per layer
    modules = lora.lora_modules(model)
    _check_modules(modules, config)
    planned = _planned_tensors(model, config)
    metadata = {"format": "pt"}
    if fingerprint:
        metadata[FINGERPRINT_KEY] = json.dumps(lora.base_fingerprint(model, config), sort_keys=True)
    tensors = {}
    stored = {name: _storage_dtype(dtype, value, name) for name, (value, _) in planned.items()}  # save_pretrained's
    arrays = _to_host([value for value, _ in planned.values()])  # every process: gathers are collective
    narrowed = {name: array for name, array in zip(planned, arrays) if narrows_value(stored[name], array)}
    refuse_narrowed(dict(zip(narrowed, largest_finite([(a, None) for a in narrowed.values()], list))),
                    list(narrowed), stored, "the adapter", "dtype")
    for (name, (_, transpose)), array in zip(planned.items(), arrays):
        tensors[name] = np.ascontiguousarray(array.T if transpose else array, dtype=stored[name])
    directory = Path(directory)
    if jax.process_index() == 0:
        directory.mkdir(parents=True, exist_ok=True)
        peft_config = _peft_config(model, config, base_model_name_or_path)
        (directory / ADAPTER_CONFIG_NAME).write_text(json.dumps(peft_config, indent=2, sort_keys=True) + "\n")
        write_safetensors(tensors, directory / ADAPTER_WEIGHTS_NAME, metadata=metadata)
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices("easytrain:save_peft_adapter")
    return directory


def _read_tensors(directory: Path) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    path = directory / ADAPTER_WEIGHTS_NAME
    if not path.is_file():
        alternative = " (adapter_model.bin found: re-save it with safe_serialization=True)" if (
            directory / "adapter_model.bin").is_file() else ""
        raise CheckpointError(f"{path} not found{alternative}; only safetensors adapters load.")
    try:
        with safe_open(path, framework="numpy") as handle:
            return {name: handle.get_tensor(name) for name in handle.keys()}, handle.metadata() or {}
    except SafetensorError as error:
        raise damaged_file(path, error) from error


def _recorded_fingerprint(path: Path, text: str) -> dict[str, Any]:
    """The base fingerprint `save_peft_adapter` recorded in `path`'s metadata, or a `damaged_file` refusal."""
    try:
        fingerprint = json.loads(text)
    except ValueError as error:
        raise damaged_file(path, ValueError(f"its {FINGERPRINT_KEY} metadata is no JSON: {error}")) from error
    if not isinstance(fingerprint, dict):
        raise damaged_file(path, TypeError(f"its {FINGERPRINT_KEY} metadata is a JSON {type(fingerprint).__name__}, "
                                           "not an object"))
    return fingerprint


def _assign(variable: nnx.Variable, value: np.ndarray, what: str) -> None:
    """``variable`` takes ``value`` (its shape checked), keeping its dtype and placement."""
    old = variable.get_value()
    if tuple(value.shape) != tuple(old.shape):
        raise CheckpointError(f"{what} has shape {tuple(value.shape)} but the model expects {tuple(old.shape)}; "
                              "the adapter was made for another base model.")
    sharding = lora._placed_sharding(old)
    new = np.asarray(value).astype(old.dtype)
    variable.set_value(jax.device_put(new, sharding) if sharding is not None else jnp.asarray(new))


def _check_names(found: set[str], expected: set[str], directory: Path) -> None:
    missing, unexpected = sorted(expected - found), sorted(found - expected)
    if missing or unexpected:
        parts = [f"{label} ({len(items)}): {listed(items, 6)}"
                 for label, items in (("missing", missing), ("unexpected", unexpected)) if items]
        raise CheckpointError(f"{directory / ADAPTER_WEIGHTS_NAME} does not match the modules its "
                              f"target_modules select in this model: {'; '.join(parts)}. Check that the adapter "
                              "was trained on this base model (same architecture and layer count).")


def _check_modules_to_save(model: nnx.Module, config: LoRAConfig, raw: dict[str, Any], directory: Path) -> None:
    """PEFT trains the modules whose name ends with an entry of ``modules_to_save``; easytrain's booleans train
    the embedding with the head and every norm. Refuse a list they cannot match, so training trains no more."""
    tied = _tied(model)
    names = [lora.hf_module_name(path) for path, _ in nnx.iter_modules(model) if path] + (["lm_head"] if tied else [])
    suffixes = [str(m) for m in raw.get("modules_to_save") or []]
    peft = {"model.embed_tokens" if tied and name == "lm_head" else name  # one matrix in a tied model
            for name in names if any(name.endswith(suffix) for suffix in suffixes)}
    ours = {lora.hf_module_name(path) for path, node in nnx.iter_modules(model) if path and (
        (config.train_embeddings and str(path[-1]) in ("embed_tokens", "lm_head"))
        or (config.train_norms and isinstance(node, RMSNorm)))}
    if extra := sorted(ours - peft):
        raise CheckpointError(
            f"{directory / ADAPTER_CONFIG_NAME}: modules_to_save={raw.get('modules_to_save')!r} has PEFT train "
            f"{sorted(peft)[:6]}, but easytrain trains the input embedding together with the output head "
            "(train_embeddings) and every norm (train_norms), so continuing to train would also train "
            f"{listed(extra, 6)}. Make the adapter in PEFT with whole groups "
            "(['embed_tokens', 'lm_head'] and/or ['norm'], which PEFT matches as name suffixes), or merge it in "
            "PEFT (merge_and_unload()) and load the merged model with easytrain.models.from_pretrained.")


_UNTIED_BY_PEFT = {  # which copies PEFT trains when modules_to_save names these without ensure_weight_tying
    ("embed_tokens",): "gives the trained copy to the input embedding only and keeps the base matrix as output head",
    ("lm_head",): "gives the trained copy to the output head only and keeps the base matrix as input embedding",
    ("embed_tokens", "lm_head"): "trains a separate copy for the input embedding and for the output head",
}


def _check_tied_head(tensors: dict[str, np.ndarray], raw: dict[str, Any], directory: Path) -> None:
    """A tied model has one matrix for input embedding and output head; so must the adapter."""
    if not raw.get("ensure_weight_tying"):
        saved = tuple(sorted({str(m).rsplit(".", 1)[-1] for m in raw.get("modules_to_save") or []}
                             & set(EMBEDDING_MODULES)))
        raise CheckpointError(
            f"{directory / ADAPTER_CONFIG_NAME}: modules_to_save={raw.get('modules_to_save')!r} names the shared "
            "embedding matrix of a model with tie_word_embeddings=True but ensure_weight_tying is not set, so PEFT "
            f"{_UNTIED_BY_PEFT[saved]}; a tied easytrain model cannot represent that. Merge the adapter with PEFT "
            "(merge_and_unload), save it untied, and load that instead.")
    head, embedding = tensors.pop(PEFT_PREFIX + HEAD_NAME, None), tensors.get(PEFT_PREFIX + EMBEDDING_NAME)
    if head is not None and (embedding is None or not np.array_equal(head, embedding)):
        raise CheckpointError(f"{directory / ADAPTER_WEIGHTS_NAME}: {PEFT_PREFIX + HEAD_NAME} differs from "
                              f"{PEFT_PREFIX + EMBEDDING_NAME}, but the model ties them.")


def load_peft_adapter(
    directory: str | os.PathLike,
    model: nnx.Module,
    *,
    rngs: nnx.Rngs | int = 0,
    verify_base: bool = False,
) -> nnx.Module:
    """Applies a PEFT LoRA adapter (trained with PEFT or saved by ``save_peft_adapter``) to ``model``, in place.

    The adapted modules are those its ``target_modules`` select, as PEFT selects them (a listed name the model lacks
    is skipped with an info log; a target ``modules_to_save`` also names takes no adapter), and the file must
    hold exactly their ``lora_A``/``lora_B`` tensors (one error lists every missing and unexpected one).
    Modules in ``modules_to_save`` (embeddings, norms, ...) overwrite the model's own weights, as in PEFT; the list
    must be exactly what ``train_embeddings``/``train_norms`` train (embedding with head, every norm).
    Adapters land on the kernel's mesh when the model is sharded.

    Args:
        directory: Holds ``adapter_config.json`` and ``adapter_model.safetensors``.
        model: An easytrain model without adapters, built from the adapter's base model.
        rngs: Seeds the dropout streams (the adapters' values all come from the file).
        verify_base: Check the base weights against the fingerprint ``save_peft_adapter`` recorded (same
            values and dtype as when the adapter was saved); adapters without one are not checked.

    Returns:
        ``model`` with the adapter applied (``easytrain.lora.LoRADense`` layers).

    Raises:
        CheckpointError: Unsupported adapter config (``modules_to_save`` included), tensors that do not fit the
            model, or (with ``verify_base``) base weights other than those the adapter was saved on.
    """
    with layers_unstacked(model):  # PEFT names tensors per layer; stacked layers are restacked with the adapter
        return _load_peft_adapter(Path(directory), model, rngs, verify_base)


def _load_peft_adapter(directory: Path, model: nnx.Module, rngs: nnx.Rngs | int, verify_base: bool) -> nnx.Module:
    config, raw = read_peft_config(directory)
    tensors, metadata = _read_tensors(directory)
    if verify_base and FINGERPRINT_KEY in metadata:
        expected = _recorded_fingerprint(directory / ADAPTER_WEIGHTS_NAME, metadata[FINGERPRINT_KEY])
        actual = lora.base_fingerprint(model, config)
        if differ := sorted(k for k in set(expected) | set(actual) if expected.get(k) != actual.get(k)):
            raise CheckpointError(f"the base weights differ from those the adapter in {directory} was saved on "
                                  f"({len(differ)} tensors, e.g. {differ[:4]}); load the base model it was "
                                  "trained on (same checkpoint and param_dtype).")
    try:
        targets = {lora.hf_module_name(path): dense for path, dense in lora._targets(model, config).items()}
    except lora.LoRAConfigError as error:
        raise CheckpointError(f"{directory / ADAPTER_CONFIG_NAME}: {error}") from error
    if done := sorted(name for name, dense in targets.items() if isinstance(dense, LoRADense)):
        raise CheckpointError(f"{done[:4]} already have adapters; load a PEFT adapter onto a model without any.")
    full = {}  # PEFT name -> (variable, transpose) of the non-adapter parameters
    for path, variable in nnx.to_flat_state(nnx.state(model, nnx.All(nnx.Param, nnx.Not(nnx.LoRAParam)))):
        name, transpose = hf_name(path)
        full[PEFT_PREFIX + name] = (variable, transpose)
    _check_modules_to_save(model, config, raw, directory)
    if _tied(model) and config.train_embeddings:
        _check_tied_head(tensors, raw, directory)
    # Whole tensors: modules_to_save, and base weights of adapted layers PEFT saves as ``<module>.base_layer.weight``
    # (when it adapts an embedding-like layer such as lm_head, in case the vocabulary was resized).
    found_full = {name: full[name.replace(".base_layer.", ".")] for name in tensors
                  if name.replace(".base_layer.", ".") in full}
    adapter_shapes = {}
    for name, dense in targets.items():
        in_features, out_features = dense.kernel.shape
        adapter_shapes[f"{PEFT_PREFIX}{name}.lora_A.weight"] = (config.rank, in_features)
        adapter_shapes[f"{PEFT_PREFIX}{name}.lora_B.weight"] = (out_features, config.rank)
    _check_names(set(tensors) - set(found_full), set(adapter_shapes), directory)
    expected = {**adapter_shapes, **{n: tuple(v.shape[::-1] if t else v.shape) for n, (v, t) in found_full.items()}}
    if wrong := sorted(f"{n} {tuple(tensors[n].shape)} != {expected[n]}" for n in expected
                       if tuple(tensors[n].shape) != expected[n]):
        raise CheckpointError(f"{directory / ADAPTER_WEIGHTS_NAME}: tensor shape mismatch ({len(wrong)}): "
                              f"{'; '.join(wrong[:4])}; the adapter was made for another base model.")
    lora.apply_lora(model, config, rngs)
    for name, module in lora.lora_modules(model).items():
        for part, variable in (("A", module.lora_a), ("B", module.lora_b)):
            key = f"{PEFT_PREFIX}{name}.lora_{part}.weight"
            _assign(variable, np.asarray(tensors[key]).T, key)
    for name, (variable, transpose) in sorted(found_full.items()):
        value = np.asarray(tensors[name])
        _assign(variable, value.T if transpose else value, name)
    return model
