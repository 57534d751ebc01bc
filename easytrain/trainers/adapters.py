"""LoRA in a trainer run: which variables train, what stays a frozen base, and how the result is exported.

`BaseTrainer` asks this module three things when `lora_rank > 0`: how to split the module's variables
(adapters train, the base weights are neither differentiated nor checkpointed), how to add the adapters
(`adapt`), and how to write the trained model (`export`: merged Hugging Face weights, a PEFT adapter,
or both). Without LoRA every function here is the identity of the full fine-tuning path.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any, Callable, Mapping

import jax
from flax import nnx

from easytrain import lora
from easytrain.argument_checks import field_defaults
from easytrain.errors import ArgumentError
from easytrain.listing import listed
from easytrain.lora_config import (LoRAConfig, LoRAConfigError, as_argument_error, from_arguments,
                                   targets_from_arguments)
from easytrain.models import save_pretrained
from easytrain.models.hf_export import ADAPTER_DIRNAME, remove_earlier_model
from easytrain.models.hf_io import CheckpointError
from easytrain.models.peft_io import load_peft_adapter, read_peft_config, save_peft_adapter
from easytrain.trainers.lora_record import check_source_lora
from easytrain.trainers.run_dir import StartCheck


def run_config(args: Any) -> LoRAConfig | None:
    """The run's `LoRAConfig`: from `lora_adapter_path`'s adapter_config.json when set (read again at every start:
    a resume compares it with the one its checkpoint recorded, `lora_record`), else from the `lora_*` arguments
    (None when `lora_rank` is 0). A trainer reads it inside its start's agreement (`start_check`)."""
    if not args.lora_adapter_path:
        return from_arguments(args)
    try:
        config, _ = read_peft_config(args.lora_adapter_path)
    except CheckpointError as error:  # it names the file; name the argument that pointed there too
        raise ArgumentError("lora_adapter_path", str(error)) from error
    check_adapter_fields(args, config)
    return config


def start_check(args: Any) -> tuple[StartCheck, Callable[[], LoRAConfig | None]]:
    """What `run_dir.check_output_dir` runs on the checkpoint it decided to resume, and the run's `LoRAConfig`
    (`run_config`, read once: a trainer reads it first in that decision, its `read_inputs`). Run inside it, an adapter
    config one process cannot read (its mount, its permissions, bad JSON) stops every process alike
    (`start_agreement`): read before it, that process raised alone and the others waited in a later collective,
    named nowhere. An `init_weights_from` source's adapters of another rank or scaling are refused on a fresh start
    only, since a resume continues its own adapters (the resume wins), whatever the source became since; the resume
    is the one decided, so the checkpoints are not listed again to learn whether it resumes."""
    config = functools.cache(lambda: run_config(args))

    def check(resume: tuple[Path, int] | None) -> None:
        if (lora := config()) is not None and args.init_weights_from and resume is None:
            check_source_lora(args.init_weights_from, lora, args.lora_adapter_path)

    return check, config


def _adapter_values(config: LoRAConfig) -> dict[str, Any]:
    """The `lora_*` arguments an adapter's config decides, with its values."""
    return {"lora_rank": config.rank, "lora_alpha": config.alpha, "lora_dropout": config.dropout,
            "lora_target_modules": config.target_modules, "lora_train_embeddings": config.train_embeddings,
            "lora_train_norms": config.train_norms, "lora_use_rslora": config.use_rslora}


def _same(field: str, given: Any, decided: Any) -> bool:
    if field == "lora_target_modules":  # names in any order, or one regular expression
        given = targets_from_arguments(given)
        return given == decided if isinstance(given, str) or isinstance(decided, str) else set(given) == set(decided)
    return given == decided


def check_adapter_fields(args: Any, config: LoRAConfig) -> None:
    """Refuse a `lora_*` argument set off its default to another value than `lora_adapter_path`'s config: the
    adapter decides them, so the value given would be silently replaced."""
    defaults = field_defaults(args)
    for field, decided in _adapter_values(config).items():
        given = getattr(args, field)
        if _same(field, given, defaults[field]) or _same(field, given, decided):
            continue
        shown = list(decided) if isinstance(decided, tuple) else decided
        raise ArgumentError(field, f"is {given!r} but the adapter in lora_adapter_path has {shown!r}; drop "
                                   f"--{field} (the adapter decides it), or pass its value.")


def partition(config: LoRAConfig | None, trainable: nnx.filterlib.Filter) -> dict[str, nnx.filterlib.Filter]:
    """`trainable` and `base` filters for `placement`: under LoRA the adapters (and what the config also
    trains) get gradients and every other parameter is the frozen base; otherwise nothing is a base."""
    if config is None:
        return {"trainable": trainable, "base": nnx.Nothing}
    return {"trainable": lora.lora_trainable(config), "base": nnx.Param}


def adapt(module: nnx.Module, config: LoRAConfig | None, seed: int, adapter_path: str | None = None) -> nnx.Module:
    """`module` with the adapters `config` asks for (in place), named after the `lora_*` arguments on error;
    with `adapter_path`, the adapters (and values) of that PEFT adapter directory."""
    if config is None:
        return module
    if adapter_path:
        if not _concrete(module):  # built inside `jax.jit` / `nnx.eval_shape` from random initialisers
            raise ArgumentError("lora_adapter_path", "needs pretrained base weights: set model_name_or_path (or "
                                                     "pass model=) to the base model the adapter was trained on.")
        return load_peft_adapter(adapter_path, module, rngs=nnx.Rngs(params=seed, dropout=seed + 1))
    try:
        return lora.apply_lora(module, config, rngs=nnx.Rngs(params=seed, dropout=seed + 1))
    except LoRAConfigError as error:
        raise as_argument_error(error) from None


def _concrete(module: nnx.Module) -> bool:
    return all(isinstance(leaf, jax.Array) and not isinstance(leaf, jax.core.Tracer)
               for leaf in jax.tree.leaves(nnx.state(module)))


def check_base(stored: Mapping[str, Any], current: Mapping[str, Any]) -> None:
    """Refuse to put a checkpoint's adapters onto a base other than the one they were trained on.

    `stored` / `current` are run infos; `base_fingerprint` maps each frozen base tensor to its digest.
    """
    expected, actual = stored.get("base_fingerprint"), current.get("base_fingerprint")
    if expected is None and actual is None:
        return
    if expected is None or actual is None:
        had = "adapters on a frozen base" if expected is not None else "the full model"
        raise ArgumentError("lora_rank", f"the checkpoint trained {had}, this run would train "
                                         f"{'the full model' if expected is not None else 'adapters'}. Resume "
                                         "with the checkpoint's lora_rank, or start a new output_dir.")
    changed = sorted(name for name in expected.keys() | actual.keys() if expected.get(name) != actual.get(name))
    if changed:
        raise ArgumentError("model_name_or_path", f"the base model differs from the one the checkpoint's adapters "
                                                  f"were trained on ({len(changed)} tensor(s) differ: "
                                                  f"{listed(changed, 5)}). Resume over the same base weights, or start "
                                                  "a new output_dir.")


def export(directory: Path, model: nnx.Module, config: LoRAConfig, *, how: str, model_config: Any,
           tokenizer: Any = None, base_model_name_or_path: str | None = None,
           generation_config: Any = None) -> Path:
    """Write an adapted model: `how="merged"` (Hugging Face weights with the adapters folded in, with
    `generation_config`: the base's, else derived) into `directory`, `"adapter"` (PEFT's format) into
    `directory/adapter`, or `"both"`. What an earlier export there wrote and this one does not is removed (process 0):
    the merged model's weights and configs under `"adapter"`, the adapter under `"merged"` (`save_pretrained`)."""
    if how == "adapter" and jax.process_index() == 0:
        remove_earlier_model(Path(directory))
    if how in ("merged", "both"):
        save_pretrained(directory, lora.merge_lora(model), model_config, tokenizer=tokenizer,
                        generation_config=generation_config)
    if how in ("adapter", "both"):
        adapter_dir = save_peft_adapter(directory / ADAPTER_DIRNAME, model, config,
                                        base_model_name_or_path=base_model_name_or_path)
        if tokenizer is not None and jax.process_index() == 0:
            tokenizer.save_pretrained(adapter_dir)
    return directory
