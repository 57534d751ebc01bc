"""The LoRA config a run trains with, as its checkpoints record it (`LORA_CONFIG_KEY` in run_info), and the checks
that compare it: a resume (`check_lora_resume`), whichever route set it (the `lora_*` arguments or
`lora_adapter_path`'s adapter_config.json, read again at every start), and a run started from another run's
weights (`check_source_lora`: the copied adapters compute another function under another scaling).

A checkpoint written before the record was kept is compared by its arguments (`lora_changes`), as before.
"""

from __future__ import annotations

import logging
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Callable, Collection

from easytrain.argument_checks import field_defaults
from easytrain.checkpoint_dirs import CheckpointNotFoundError, resolve_checkpoint
from easytrain.checkpoint_items import READ_ERRORS, stored_run_info
from easytrain.checkpoint_read_errors import source_read_error
from easytrain.errors import ArgumentError
from easytrain.lora_config import (LORA_ONLY_FIELDS, LoRAConfig, LoRAConfigError, from_arguments,
                                   targets_from_arguments, unused_lora_fields_error)

logger = logging.getLogger("easytrain")

#: The run_info entry of the LoRA config in use (`config_record`); absent under full fine-tuning.
LORA_CONFIG_KEY = "lora_config"
# What the adapters are: a change would not fit (or not mean the same on) the checkpoint's adapters.
LORA_FIELDS = ("lora_rank", "lora_alpha", "lora_dropout", "lora_target_modules", "lora_train_embeddings",
               "lora_train_norms", "lora_use_rslora")
#: The recorded fields a resume compares (`init_a` only decides fresh values, which a resume restores), each the
#: `lora_*` argument of its name; the adapter_config.json key that sets it under `lora_adapter_path`.
COMPARED = {"rank": "r", "alpha": "lora_alpha", "dropout": "lora_dropout", "target_modules": "target_modules",
            "train_embeddings": "modules_to_save", "train_norms": "modules_to_save", "use_rslora": "use_rslora"}
#: The fields whose change makes copied adapters compute another function (`check_source_lora`).
SCALING_FIELDS = ("rank", "alpha", "use_rslora")


def config_record(config: LoRAConfig | None, adapter_path: str | None = None) -> dict[str, Any] | None:
    """The JSON record of the LoRA config in use (None without LoRA): every field, its scaling, and where it came
    from (`lora_adapter_path`'s adapter_config.json, or the `lora_*` arguments)."""
    if config is None:
        return None
    targets = config.target_modules
    return {"rank": config.rank, "alpha": config.alpha, "dropout": config.dropout,
            "target_modules": targets if isinstance(targets, str) else list(targets),
            "train_embeddings": config.train_embeddings, "train_norms": config.train_norms,
            "use_rslora": config.use_rslora, "init_a": config.init_a, "param_dtype": config.param_dtype,
            "scaling": config.scaling, "source": "lora_adapter_path" if adapter_path else "arguments",
            **({"adapter_path": str(Path(adapter_path).expanduser().absolute())} if adapter_path else {})}


def _comparable(field: str, value: Any) -> Any:
    """Target names compare as a set (the order adapts the same layers); a pattern as itself."""
    return sorted(set(value)) if field == "target_modules" and isinstance(value, (list, tuple)) else value


def config_changes(stored: dict[str, Any], current: dict[str, Any],
                   fields: Collection[str] = tuple(COMPARED)) -> list[tuple[str, Any, Any]]:
    """(field, checkpoint's value, this run's value) of each of `fields` the two records hold with other values."""
    return [(field, stored[field], current[field]) for field in fields
            if field in stored and field in current and _comparable(field, stored[field]) != _comparable(
                field, current[field])]


def described(changes: list[tuple[str, Any, Any]], stored: dict[str, Any], current: dict[str, Any]) -> str:
    """`config_changes` as an error lists them, with both scalings where one of `SCALING_FIELDS` changed."""
    listed = "; ".join(f"lora_{field}: checkpoint {old!r} vs now {new!r}" for field, old, new in changes)
    if any(field in SCALING_FIELDS for field, _, _ in changes) and "scaling" in stored and "scaling" in current:
        listed += f" (adapter scaling {stored['scaling']:g} vs {current['scaling']:g})"
    return listed


def check_lora_resume(run_info: dict[str, Any], current: dict[str, Any],
                      hint: Callable[[list[str]], str]) -> None:
    """Refuse a resume whose LoRA config differs from the one the checkpoint's adapters were trained with, compared
    as recorded where both runs recorded it, else by their `lora_*` arguments (`lora_changes`). `hint(shown)` is the
    rerun hint of the other differing arguments (`resume_checks.rerun_hint`)."""
    stored_args, current_args = run_info.get("arguments") or {}, current["arguments"]
    stored, now = run_info.get(LORA_CONFIG_KEY), current.get(LORA_CONFIG_KEY)
    if not (isinstance(stored, dict) and isinstance(now, dict)):
        if diffs := lora_changes(stored_args, current_args):
            raise ArgumentError(diffs[0].split(":")[0], "the checkpoint's adapters were trained with other LoRA "
                                "settings (" + "; ".join(diffs) + "). Resume with the same lora_* arguments, or "
                                "start a new output_dir." + hint([diff.split(":")[0] for diff in diffs]))
        return
    if not (changes := config_changes(stored, now)):
        return
    listed = described(changes, stored, now)
    was = (f" (the checkpoint's run read them from lora_adapter_path {stored.get('adapter_path')})"
           if stored.get("source") == "lora_adapter_path" else "")
    if now.get("source") == "lora_adapter_path":
        path = current_args.get("lora_adapter_path")
        keys = ", ".join(dict.fromkeys(COMPARED[field] for field, _, _ in changes))
        raise ArgumentError("lora_adapter_path", f"the adapter config read from {path} (adapter_config.json: {keys}) "
                            f"differs from the one the checkpoint's adapters were trained with{was}: {listed}. It is "
                            "read again at every start; pass the adapter directory the run started from, or restore "
                            "its adapter_config.json, to resume, or start a new output_dir." + hint([]))
    raise ArgumentError(f"lora_{changes[0][0]}", f"the checkpoint's adapters were trained with another LoRA config"
                        f"{was}: {listed}. Resume with the checkpoint's values (--lora_{changes[0][0]} "
                        f"{changes[0][1]!r}), or start a new output_dir." + hint([f"lora_{f}" for f, _, _ in changes]))


def lora_changes(stored: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """The `LORA_FIELDS` that differ, `key: a vs b`, where either run trains adapters. Where neither does (lora_rank 0
    and no lora_adapter_path on both sides: full fine-tuning) they mean nothing, so none is compared (a run saved
    before `check_lora_fields_apply` may hold one off its default); one given now, off its default and the
    checkpoint's value, is refused as it is for a fresh run: it would have no effect."""
    if any(args.get("lora_rank") or args.get("lora_adapter_path") for args in (stored, current)):
        before, now = _lora_settings(stored), _lora_settings(current)
        return [f"{key}: checkpoint {before.get(key)!r} vs now {now.get(key)!r}"
                for key in LORA_FIELDS if key in stored and before.get(key) != now.get(key)]
    from easytrain.arguments import TrainingArguments  # here: the arguments module imports the trainers' checks

    before, now = _lora_settings(stored), _lora_settings(current)
    default = _lora_settings(field_defaults(TrainingArguments))
    given = {name: current[name] for name in LORA_ONLY_FIELDS
             if name in current and now[name] not in (before.get(name, default[name]), default[name])}
    if given:
        raise unused_lora_fields_error(given, f"the checkpoint's run fine-tunes every weight too; drop "
                                              f"{', '.join('--' + name for name in given)} to resume it, or start a "
                                              "new output_dir with --lora_rank (e.g. --init_weights_from this "
                                              "checkpoint) to train LoRA adapters.")
    return []


def _lora_settings(args: dict[str, Any]) -> dict[str, Any]:
    """The LoRA fields as compared: targets as `LoRAConfig` reads them (split at commas), names as a set (unordered)."""
    targets = args.get("lora_target_modules")
    targets = targets_from_arguments(targets) if isinstance(targets, (list, tuple)) else targets
    return {**args, "lora_target_modules": sorted(set(targets)) if isinstance(targets, list) else targets}


def recorded_or_derived(run_info: dict[str, Any]) -> dict[str, Any] | None:
    """A run's LoRA config record: as its run_info recorded it, else as its `lora_*` arguments describe it (a
    checkpoint written before the record); None without LoRA, or when an adapter directory set it unrecorded."""
    if isinstance(recorded := run_info.get(LORA_CONFIG_KEY), dict):
        return recorded
    args = run_info.get("arguments") or {}
    if not args.get("lora_rank") or args.get("lora_adapter_path"):
        return None
    try:
        return config_record(from_arguments(SimpleNamespace(**{field: args.get(field) for field in LORA_FIELDS})))
    except (LoRAConfigError, TypeError):
        return None


def check_source_lora(source: str, config: LoRAConfig | None, adapter_path: str | None = None) -> None:
    """Refuse `init_weights_from` a checkpoint whose adapters were trained under another rank or scaling than this
    run's (`SCALING_FIELDS`): its lora_a / lora_b arrays, copied in, would compute another function. Other targets
    are left to the arrays (a target the source lacks starts as a fresh adapter, which changes nothing; one this run
    lacks is refused by name); dropout is this run's own choice. Reads JSON only, before anything is built.
    (Its base is compared once loaded: `init_weights.warn_other_base`.)"""
    if config is None or not (source_info := source_run_info(source)):
        return
    if (stored := recorded_or_derived(source_info)) is None:
        if (source_info.get("arguments") or {}).get("lora_adapter_path"):
            logger.info("init_weights_from %s: its run took its LoRA config from an adapter directory and predates "
                        "the record of it; its scaling is not compared with this run's", source)
        return
    now = config_record(config, adapter_path)
    if changes := config_changes(stored, now, SCALING_FIELDS):
        field = f"lora_{changes[0][0]}"
        set_by = f"lora_adapter_path ({adapter_path})" if adapter_path else f"--{field}"
        raise ArgumentError("lora_adapter_path" if adapter_path else field, f"init_weights_from {source}: its "
                            f"adapters were trained with {described(changes, stored, now)}; copied into this run "
                            f"they would compute another function. Set {set_by} to the source's value "
                            f"({changes[0][1]!r}), or drop init_weights_from to start fresh adapters.")


def source_run_info(source: str) -> dict[str, Any]:
    """The run_info of the checkpoint `source` names; empty for an exported model directory, or a path that is
    neither (the weights' reader refuses it, naming init_weights_from). A step gone between choosing and reading it
    (the source run trains on, and its save_total_limit removed the step it had just superseded) is chosen again:
    the newest one now, or none where `source` named that step (the weights' reader then refuses it).

    Raises:
        CheckpointReadError: the checkpoint's run_info cannot be read (the weights' reader never reads it: the checks
            comparing it would pass on an empty record, and adapters be copied under another scaling).
    """
    path = Path(source).expanduser()
    if (path / "config.json").is_file():
        return {}
    for again in (False, True):
        try:
            root, step = resolve_checkpoint(".", str(path))
        except CheckpointNotFoundError:
            return {}
        try:
            return stored_run_info(root / str(step))
        except FileNotFoundError as error:  # the step (CheckpointNotFoundError) or its file removed meanwhile
            if again:
                raise source_read_error(root, step, error) from error
        except READ_ERRORS as error:
            raise source_read_error(root, step, error) from error
    raise AssertionError("unreachable: the second try returns or raises")
