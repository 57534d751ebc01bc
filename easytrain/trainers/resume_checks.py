"""Whether a checkpoint can continue this run: its `run_info` compared with this run's before anything is restored.

A change that would not fit the stored arrays (architecture, optimizer or a setting that adds or removes a part of the
optimizer state where the default `configure_optimizer` builds it, `param_dtype`, LoRA settings) or would change
which examples the resumed run sees (the data-order fields, the tokenizer, the task's own settings, the training data
itself) is refused naming the fields and the rerun that restores them, and so is a fixed frozen entry rebuilt with
other values (`check_frozen_entries`); one that only bends the curve (schedule, compute settings, a trainer's loss
settings, another mesh) is warned about, once every refusal check passed. `allow_data_order_change` lets data changes
through. Local data moved to another path is compared by its content where the checkpoint records it (`moved_data`).
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Collection, Mapping, Sequence
from pathlib import Path
from typing import Any

from easytrain.argument_checks import (  # noqa: F401 (BLANK_WAS_UNSET: importable from here as before)
    BLANK_WAS_UNSET, same_setting)
from easytrain.argument_settings import OPTIMIZER_FIELDS
from easytrain.best_metric_direction import direction_change
from easytrain.config_io import ARGUMENTS_FILE
from easytrain.data.position import DIGEST_KEY, compared_keys
from easytrain.errors import ArgumentError
from easytrain.listing import listed
from easytrain.optim import SWITCH_ARGUMENTS, state_switches
from easytrain.trainers.adapters import check_base
from easytrain.trainers.lora_record import (  # noqa: F401 (lora_changes, LORA_FIELDS: importable from here as before)
    LORA_FIELDS, check_lora_resume, lora_changes)
from easytrain.trainers.restore_checks import check_frozen_entries, stored_scan_layers
from easytrain.trainers.run_dir import LAUNCH_FIELDS
from easytrain.trainers.schedule_checks import (  # noqa: F401 (SCHEDULE_*, DEFAULT_*: importable from here as before)
    DEFAULT_OPTIMIZER_KEY, SCHEDULE_FIELDS, SCHEDULE_KEY, warn_schedule_changes)

logger = logging.getLogger("easytrain")

#: The run_info layout this easytrain writes (`BaseTrainer.run_info`) and reads back on resume.
FORMAT_VERSION = 1
# Changing any of these would silently change which examples a resumed run sees, or in what order. The tokenizer
# (`tokenizer_name`, else `model_name_or_path`) is one too: other ids for the same text (`_tokenizer_change`).
DATA_ORDER_FIELDS = ("seed", "train_batch_size", "dataset_name", "dataset_config_name", "train_file",
                     "max_length", "text_column", "max_train_samples", "validation_split_percentage")
# What the stored arrays are: another optimizer has other state, another param_dtype other dtypes.
STATE_FIELDS = ("optimizer", "param_dtype")
# What the steps compute with: the stored arrays fit another value, but every later step's numbers change.
COMPUTE_FIELDS = ("dtype", "weight_decay", "adam_beta1", "adam_beta2", "adam_epsilon", "sgd_momentum",
                  "max_grad_norm", "gradient_accumulation_steps")
#: The run_info entry of a trainer's loss options (DPO's beta, ...): fit by the state, warned of like `COMPUTE_FIELDS`.
LOSS_SETTINGS_KEY = "loss_settings"
# Config keys that decide the function the model computes (its shapes, and what it computes with them: RoPE,
# activation, norm epsilon, biases, attention windows), compared between the checkpoint and the model about to be
# trained. Ids of special tokens, dtype, initialisation and version stamps are left out: they change nothing a
# resumed run computes.
ARCHITECTURE_KEYS = ("model_type", "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                     "num_attention_heads", "num_key_value_heads", "head_dim", "tie_word_embeddings",
                     "hidden_act", "rms_norm_eps", "rope_parameters", "rope_theta", "rope_scaling",
                     "partial_rotary_factor", "attention_bias", "mlp_bias", "sliding_window", "use_sliding_window",
                     "max_window_layers", "layer_types")


# Arguments that say how to start, not what the run is: they differ on every resume and are not listed. The launch
# fields too (`LAUNCH_FIELDS`): a checkpoint's run_info records process 0's, while each process has its own
# `process_id` and each launch its own coordinator. Left out here, not from run_info, so older checkpoints resume too.
FREE_ON_RESUME = ("resume_from_checkpoint", "overwrite_output_dir", "allow_data_order_change", *LAUNCH_FIELDS)
#: The `task` a checkpoint written before the running trainer's task was recorded may hold for any trainer built in
#: Python (the argument's default): not listed as a change.
UNRECORDED_TASK = "lm"
#: How many differing arguments a refusal lists (then "and N more").
MAX_LISTED = 8


def _differences(stored: dict[str, Any], current: dict[str, Any], keys: tuple[str, ...]) -> list[str]:
    return [f"{key}: checkpoint {stored.get(key)!r} vs now {current.get(key)!r}"
            for key in keys if not same_setting(key, stored.get(key), current.get(key))]


def architecture_differences(stored: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """Keys a checkpoint written before they were recorded lacks are not compared: absent is not "changed"."""
    keys = ARCHITECTURE_KEYS + _deciding_through_rope(stored) + _deciding_through_rope(current)
    return _differences(stored, current, tuple(key for key in dict.fromkeys(keys) if key in stored and key in current))


def _deciding_through_rope(config: dict[str, Any]) -> tuple[str, ...]:
    """YaRN without a factor derives it from max_position_embeddings (`easytrain.models.rope`)."""
    rope = config.get("rope_parameters") or {}
    return ("max_position_embeddings",) if rope.get("rope_type") == "yarn" and rope.get("factor") is None else ()


def config_dict(config: Any) -> dict[str, Any] | None:
    """A Hugging Face config as plain JSON values, every key (not only those differing from the class defaults, so
    a resume can compare them all); None for models without one."""
    return json.loads(config.to_json_string(use_diff=False)) if hasattr(config, "to_json_string") else None


def check_resumable(run_info: dict[str, Any], current: dict[str, Any], content_compared: bool = False) -> list[str]:
    """Refuse a resume whose model, optimizer state, data order or task settings differ from the checkpoint's
    (`refuse_changes`), then warn of the changes it allows (`warn_changes`).

    Returns the data-order changes that `allow_data_order_change` let through (empty for an exact resume).
    """
    allowed = refuse_changes(run_info, current, content_compared)
    warn_changes(run_info, current, content_compared)
    return allowed


def refuse_changes(run_info: dict[str, Any], current: dict[str, Any], content_compared: bool = False) -> list[str]:
    """Raise for a change the checkpoint cannot continue under. `run_info` is the checkpoint's, `current` this
    run's (`BaseTrainer.run_info()`); a task's own options (its `task_arguments`: SFT's packing, a distillation
    teacher) must match like the data-order fields. Logs nothing: the warnings wait until every refusal check
    passed. `content_compared`: data moved to another path is left to its digest (`moved_data`).

    Returns the data-order changes that `allow_data_order_change` let through (empty for an exact resume).
    """
    check_format(run_info)
    stored_args, current_args = run_info.get("arguments") or {}, current["arguments"]
    moved = moved_paths(stored_args, current_args) if content_compared else {}
    stored_config = run_info.get("model_config") or {}
    current_config = current.get("model_config") or {}
    if stored_config and current_config:
        diffs = architecture_differences(stored_config, current_config)
        if diffs:
            raise ArgumentError("model_config", "the checkpoint was trained with a different architecture ("
                                + "; ".join(diffs) + "). Resume with the same model, or start a new output_dir."
                                + rerun_hint(stored_args, current_args, moved=moved))
    from_arguments = arguments_built_optimizer(run_info, current)
    for name in (name for name in STATE_FIELDS if from_arguments or name not in SWITCH_ARGUMENTS):
        if name in stored_args and stored_args[name] != current_args.get(name):
            raise ArgumentError(name, f"the checkpoint's state was saved for another {name} (checkpoint "
                                f"{stored_args[name]!r} vs now {current_args.get(name)!r}). Resume with the "
                                "checkpoint's value, or start a new run from its weights with --init_weights_from "
                                "(a fresh optimizer state).")
    if from_arguments:  # else the restore's comparison of the state trees catches a layout that differs
        check_state_switches(stored_args, current_args)
    check_lora_resume(run_info, current, lambda shown: rerun_hint(stored_args, current_args, shown=shown, moved=moved))
    layout_changed = stored_scan_layers(run_info) not in (None, current_args.get("scan_layers"))
    if run_info.get("base_fingerprint") and layout_changed:
        raise ArgumentError("scan_layers", "the checkpoint's adapters were trained with scan_layers="
                            f"{stored_scan_layers(run_info)}, and their frozen base is checked by per-layout "
                            "fingerprints; resume with the same scan_layers, or start a new output_dir.")
    check_base(run_info, current)
    check_frozen_entries(run_info, current)
    order, task = _data_changes(run_info, current, content_compared)
    diffs = order + task
    if diffs and not current_args.get("allow_data_order_change"):
        altered = " and ".join(what for what, changed in (("the data order", order), (
            "the task's own settings (its trainer's run_info()['task_arguments'])", task)) if changed)
        raise ArgumentError("resume_from_checkpoint", f"these arguments changed since the checkpoint and would alter "
                            f"{altered} of the resumed run ({'; '.join(diffs)}). Restore their values, pass "
                            "--allow_data_order_change to continue anyway, or start a new output_dir."
                            + rerun_hint(stored_args, current_args, shown=[diff.split(":")[0] for diff in diffs],
                                         always=True, moved=moved))
    return diffs


def warn_changes(run_info: dict[str, Any], current: dict[str, Any], content_compared: bool = False) -> None:
    """Warn of each change `refuse_changes` let through: the resumed curve is no longer the checkpointed run's."""
    stored_args, current_args = run_info.get("arguments") or {}, current["arguments"]
    diffs = sum(_data_changes(run_info, current, content_compared), [])
    if diffs and current_args.get("allow_data_order_change"):
        logger.warning("resuming with changed settings (%s): allow_data_order_change is set, so the run continues "
                       "under the new ones from the restored step (the data in their order)", "; ".join(diffs))
    warn_schedule_changes(run_info, current)
    if ranking := direction_change(stored_args, current_args):
        logger.warning("resuming with another ranking of checkpoints: %s", ranking)
    if compute_diffs := _differences(stored_args, current_args, _compared_compute_fields(stored_args, current_args)):
        logger.warning("resuming with other settings of what each step computes (%s): the restored state fits, but "
                       "the steps from here on are not what the checkpointed run would have computed (resume with the "
                       "checkpoint's values for an exact continuation)", "; ".join(compute_diffs))
    if loss_diffs := _loss_differences(run_info, current):
        logger.warning("resuming with other loss settings (%s): the restored state fits, but the objective from here "
                       "on is not the checkpointed run's (resume with the checkpoint's values for an exact "
                       "continuation)", "; ".join(loss_diffs))
    if run_info.get("mesh") not in (None, current.get("mesh")):
        logger.warning("resuming on another mesh (checkpoint %s vs now %s): the state is restored into the new layout, "
                       "but each step's sums run in another order, so the curve continues to rounding, not bit for "
                       "bit", run_info["mesh"], current.get("mesh"))


def _loss_differences(run_info: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """The loss options (`LOSS_SETTINGS_KEY`) both runs record that differ, `key: a vs b`. A checkpoint written
    before they were recorded is noted once, not compared: absent is not "changed"."""
    stored, now = run_info.get(LOSS_SETTINGS_KEY), current.get(LOSS_SETTINGS_KEY)
    if stored is None and now:
        logger.info("the checkpoint predates the record of the loss settings (%s): a change of them since is not "
                    "checked", ", ".join(now))
    if not stored or not now:
        return []
    return _differences(stored, _json_form(now), tuple(key for key in now if key in stored))


def _data_changes(run_info: dict[str, Any], current: dict[str, Any],
                  content_compared: bool = False) -> tuple[list[str], list[str]]:
    """The changes of the data order (arguments, tokenizer) and of the task's own settings, each `key: a vs b`;
    under `content_compared`, less the data moved to another path (`moved_data`)."""
    stored_args, current_args = run_info.get("arguments") or {}, current["arguments"]
    moved = moved_paths(stored_args, current_args) if content_compared else {}
    order = (_differences(stored_args, current_args, tuple(key for key in DATA_ORDER_FIELDS if key not in moved))
             + _tokenizer_change(stored_args, current_args, run_info, current))
    stored_task, current_task = run_info.get("task_arguments") or {}, _json_form(current.get("task_arguments") or {})
    return order, _differences(stored_task, current_task, tuple(sorted(stored_task.keys() | current_task.keys())))


def _json_form(values: dict[str, Any]) -> dict[str, Any]:
    """`values` as the checkpoint's JSON gives them back (a tuple as a list, an int key as a string); else as given."""
    try:
        return json.loads(json.dumps(values, allow_nan=False))
    except (TypeError, ValueError):
        return values


def arguments_built_optimizer(run_info: dict[str, Any], current: dict[str, Any]) -> bool:
    """Whether the default `configure_optimizer` built both the checkpoint's optimizer state and this run's, so that
    their arguments (`optimizer`, the `state_switches`) tell each state's layout. A checkpoint written before this
    was recorded counts as this run's; a `current` that does not record it, as the default."""
    now = current.get(DEFAULT_OPTIMIZER_KEY, True)
    return bool(now and run_info.get(DEFAULT_OPTIMIZER_KEY, now))


def _compared_compute_fields(stored: dict[str, Any], current: dict[str, Any]) -> tuple[str, ...]:
    """The `COMPUTE_FIELDS` the checkpoint recorded, less the optimizer settings this run's optimizer does not read
    (Adam's betas under SGD: no step computes with them)."""
    reads = OPTIMIZER_FIELDS.get(current.get("optimizer"))
    optimizer_settings = {name for names in OPTIMIZER_FIELDS.values() for name in names}
    return tuple(key for key in COMPUTE_FIELDS
                 if key in stored and (reads is None or key not in optimizer_settings or key in reads))


# Per argument of `state_switches`: what it switches in the optimizer state, and the fix when the checkpoint's state
# has that part (True) or lacks it (False).
_SWITCHED = {
    "max_grad_norm": ("gradient clipping (chained when max_grad_norm > 0)", {
        True: "any positive max_grad_norm keeps the checkpoint's optimizer state (1e9 to clip effectively never)",
        False: "max_grad_norm 0 keeps the checkpoint's optimizer state (no clipping)"}),
    "weight_decay": ("Adafactor's weight-decay step (chained when weight_decay > 0)", {
        True: "any positive weight_decay keeps the checkpoint's optimizer state (1e-9 to decay effectively never)",
        False: "weight_decay 0 keeps the checkpoint's optimizer state (no decay)"}),
    "sgd_momentum": ("SGD's momentum trace (kept when sgd_momentum > 0)", {
        True: "any positive sgd_momentum keeps the checkpoint's optimizer state (1e-6 is plain SGD in effect)",
        False: "sgd_momentum 0 keeps the checkpoint's optimizer state (plain SGD)"}),
}


def check_state_switches(stored: dict[str, Any], current: dict[str, Any]) -> None:
    """Refuse a resume that switches a part of the optimizer state on or off (`easytrain.optim.state_switches`):
    the stored state would not fit the one this run builds. Another value with the same switch is only warned of
    (`COMPUTE_FIELDS`)."""
    before, now = state_switches(stored), state_switches(current)
    for name in (name for name in before if name in now):
        if before[name] != now[name]:
            part, fixes = _SWITCHED[name]
            with_or_without = {True: "with", False: "without"}
            raise ArgumentError(name, f"the checkpoint's optimizer state was saved {with_or_without[before[name]]} "
                                f"{part}, and this run's would be {with_or_without[now[name]]} it: a state of another "
                                f"layout (checkpoint {stored[name]!r} vs now {current[name]!r}). To resume: "
                                f"{fixes[before[name]]}; or start a new run from its weights with --init_weights_from "
                                "(a fresh optimizer state).")


def rerun_hint(stored: dict[str, Any], current: dict[str, Any], shown: Collection[str] = (),
               always: bool = False, moved: Mapping[str, Any] | None = None) -> str:
    """Where a resume is refused for a change: every argument that differs from the checkpoint's saved ones (a
    resume given only `--output_dir` and `--resume_from_checkpoint` leaves the data and tokenizer flags out, and
    the refusal would otherwise blame only their effect) and the rerun that restores them all, keeping the new path
    of data that `moved` (`moved_data`: the saved one may be gone). Empty if none differs, unless `always`."""
    moved = moved or {}
    names = [name for name in dict.fromkeys([*stored, *current]) if name not in moved
             and name not in FREE_ON_RESUME and name not in shown
             and not same_setting(name, stored.get(name), current.get(name))
             and not (name == "task" and stored.get(name) == UNRECORDED_TASK)]
    if not names and not always:
        return ""
    differing = listed((f"{name}: checkpoint {_short(stored.get(name))} vs now {_short(current.get(name))}"
                        for name in names), MAX_LISTED, "; ")
    what = "Other arguments" if shown else "Arguments"
    others = f" {what} that differ from the checkpoint's: {differing}." if names else ""
    config = Path(str(stored.get("output_dir") or current.get("output_dir") or "<output_dir>")) / ARGUMENTS_FILE
    keep = "".join(f" --{name} {'none' if value is None else value}" for name, value in moved.items())
    kept = f" (keep{keep}: the data moved there, and its rows are compared by content)" if moved else ""
    return (f"{others} To resume with the checkpoint's own settings: easytrain train --config {config}{kept} (plus "
            "only the flags you mean to change).")


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _tokenizer_change(stored: dict[str, Any], current: dict[str, Any], stored_info: dict[str, Any],
                      current_info: dict[str, Any]) -> list[str]:
    """The tokenizer the run loads (`tokenizer_name`, else `model_name_or_path`'s), if it changed: another one gives
    other token ids for the same text, even at the same vocabulary size. Compared by its `tokenizer_fingerprint`
    where both runs recorded one (a tokenizer moved to another path is the same), else by its path."""
    before, now = (args.get("tokenizer_name") or args.get("model_name_or_path") for args in (stored, current))
    fingerprints = stored_info.get("tokenizer_fingerprint"), current_info.get("tokenizer_fingerprint")
    if (fingerprints[0] == fingerprints[1]) if all(fingerprints) else before == now:
        return []
    named = stored.get("tokenizer_name") or current.get("tokenizer_name")
    return [f"tokenizer_name{'' if named else ' (from model_name_or_path)'}: checkpoint {before!r} vs now {now!r}"]


#: The fields that name local training data, each read as its own kind of source (`easytrain.data.sources`).
SOURCE_FIELDS = ("train_file", "dataset_name")


def moved_paths(stored: dict[str, Any], current: dict[str, Any]) -> dict[str, Any]:
    """Local training data named by another path than the checkpoint's, `{field: new path}` (a copy on another
    cluster, /scratch copied to /data): `train_file` where both name one, `dataset_name` where this run's is a local
    folder or file (the checkpoint's may be gone). Data that moved to the other field (a `dataset_name` folder's file
    now given as `train_file`, or back) gives both fields, the one given up as None. Whether it holds the same rows
    only their digest tells: the two fields read some files otherwise (`check_data_position`)."""
    moved = {key: current[key] for key in SOURCE_FIELDS if stored.get(key) and current.get(key)
             and stored[key] != current[key] and _local(current, key)}
    across = [(old, new) for old, new in (SOURCE_FIELDS, SOURCE_FIELDS[::-1]) if stored.get(old) and current.get(new)
              and not stored.get(new) and not current.get(old) and _local(current, new)]
    return moved or {field: current.get(field) for field in (across[0] if across else ())}


def _local(arguments: dict[str, Any], key: str) -> bool:
    """Whether `arguments[key]` names local data: a `train_file` always, a `dataset_name` where it exists here (else a
    Hub name)."""
    return key == "train_file" or os.path.exists(str(arguments[key]))


def moved_data(stored: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """`moved_paths` as `key: checkpoint a vs now b`, for messages; a move to the other field as `dataset_name:
    checkpoint a vs now train_file b` (or back)."""
    moved = moved_paths(stored, current)
    if None in moved.values():  # across the fields: the one given up is None
        (old, _), (new, path) = sorted(moved.items(), key=lambda item: item[1] is not None)
        return [f"{old}: checkpoint {stored[old]!r} vs now {new} {path!r}"]
    return [f"{key}: checkpoint {stored[key]!r} vs now {path!r}" for key, path in moved.items()]


#: Where data moved between `train_file` and a `dataset_name` folder: why the same file may give other rows.
_ACROSS_FIELDS = ("; moved between dataset_name and train_file, the same file may also be read otherwise: a "
                  "train_file's CSV cells are read literally and as text and a .txt file's byte-order mark is dropped, "
                  "while a dataset_name folder's files are read as datasets infers them ('NA' a missing value, "
                  "numbers as numbers) and its files named for a split (validation.jsonl) are that split, not "
                  "training rows. To read it as the run did, give it under the checkpoint's field, at the path named "
                  "here (--dataset_name none --train_file FILE, or --train_file none --dataset_name FOLDER)")


def check_data_position(position: dict[str, Any], fingerprint: Mapping[str, Any] | None, allow: bool,
                        moved: Sequence[str] = (), across_fields: bool = False) -> bool:
    """Whether the saved data position can be kept: it was saved for the same data (`fingerprint`, the loader's
    `seed`, `global_batch_size`, `num_rows` and `data_digest`, the rows' content). The same arguments over other
    files, another dataset version, edited rows (another `dataset_train` of the same length) or the same rows
    tokenised otherwise (an easytrain that splits prompt and completion otherwise) change `num_rows` or the digest:
    refused like a data-order change, or, under `allow_data_order_change`, the position is dropped and
    the data starts afresh (in the new data's order) at the restored step. A position saved before digests were
    recorded is compared without one. Without a fingerprint (a loader of the trainer's own) nothing is compared
    here; the loader checks when the position is set. `moved` (`moved_data`) is named with a content change, and
    where the data moved to the other field (`across_fields`) how the two fields read a file otherwise."""
    if fingerprint is None:
        return True
    if not (diffs := _differences(position, dict(fingerprint), compared_keys(position, fingerprint))):
        return True
    described, behind = "; ".join([*diffs, *moved]), "at its new path" if moved else "with the same arguments"
    if allow:
        logger.warning("the training data changed since the checkpoint (%s): allow_data_order_change is set, so the "
                       "data starts afresh at the restored step, in the new data's order", described)
        return False
    what = ("the same number of rows with other content (edited examples, another dataset of the same length, or "
            "the rows tokenise differently: another tokenizer or chat template, or an easytrain version that "
            "tokenises prompt and completion differently)"
            if all(diff.startswith(DIGEST_KEY) for diff in diffs)
            else "the files or the dataset version behind them differ")
    if across_fields:
        what += _ACROSS_FIELDS
    raise ArgumentError("resume_from_checkpoint", f"the training data changed since the checkpoint ({described}), "
                        f"{behind}: {what}, and the restored data position would pick other examples "
                        "than the interrupted run's. Restore the data it was trained on, pass "
                        "--allow_data_order_change to continue from the restored step in the new data's order, or "
                        "start a new output_dir.")


def check_format(run_info: dict[str, Any]) -> None:
    """Refuse a run_info this easytrain cannot check a resume against: one without its version or arguments
    (damaged, edited, another tool's), which would otherwise read as every setting changed, or a newer one."""
    fix = "or start a new output_dir from its weights with --init_weights_from."
    missing = [name for name, kind in (("format_version", int), ("arguments", dict))
               if not isinstance(run_info.get(name), kind)]
    if missing:
        raise ArgumentError("resume_from_checkpoint", f"the checkpoint's run_info records no {' and no '.join(missing)}"
                            " (it was damaged, edited, or written by another tool), so nothing shows what run it "
                            f"continues. Resume a checkpoint this trainer wrote, {fix}")
    if run_info["format_version"] > FORMAT_VERSION:
        raise ArgumentError("resume_from_checkpoint", f"the checkpoint's run_info has format_version "
                            f"{run_info['format_version']}, written by a newer easytrain (this one reads "
                            f"{FORMAT_VERSION}). Upgrade easytrain to resume it, {fix}")
