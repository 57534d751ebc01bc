"""What a run records beside its arrays (mixed into `BaseTrainer`): the `run_info` each checkpoint carries, so a
resume can be checked before any array is read, `arguments.json` in `output_dir`, so a rerun continues the same
job, and the checkpoint manager that writes the checkpoints.

A trainer's own settings a resume must keep come from `task_settings()`, merged over the class chain by
`run_info` (`merged_task_settings`): an override returns only its class's settings and cannot drop a parent's, as a
`run_info` override replacing `task_arguments` would (SFT's packing and masking settings under a subclass).

Each fixed frozen entry's digests (`FrozenPlan.fingerprints`, taken at set-up) are recorded too, as
`frozen_fingerprints`: a resume rebuilds such an entry from its source and compares them (`restore_checks`).

Both records name the task of the class that runs (`recorded_task`), not only the `task` argument as given: an
SFTTrainer built in Python keeps the default 'lm' there, and its arguments.json would not load as SFT's.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Mapping

from easytrain.checkpoint import CheckpointManager
from easytrain.config_io import save_arguments
from easytrain.errors import ArgumentError
from easytrain.tasks.registry import Task, resolve_task
from easytrain.trainers import builders
from easytrain.trainers.lora_record import LORA_CONFIG_KEY, config_record
from easytrain.trainers.restore_checks import FROZEN_FINGERPRINTS, stored_record
from easytrain.trainers.resume_checks import DEFAULT_OPTIMIZER_KEY, FORMAT_VERSION, SCHEDULE_KEY, config_dict
from easytrain.trainers.run_dir import rerun_arguments
from easytrain.trainers.schedule_checks import DEFAULT_SCHEDULE_MARK

logger = logging.getLogger("easytrain")


class RunRecordHooks:
    """`checkpoint_manager`, `run_info` (a task trainer adds its own entries with `super().run_info()`), its
    `task_settings` (checked at set-up: `check_task_settings`) and `save_arguments`."""

    def checkpoint_manager(self) -> CheckpointManager:
        self._checkpoints = self._checkpoints or builders.checkpoint_manager(self._arguments)
        return self._checkpoints

    def run_info(self) -> dict[str, Any]:
        """Everything besides arrays that a checkpoint must carry to be resumed or audited."""
        arguments = {**self._arguments.to_dict(), "task": self.running_task()}  # as arguments.json names it
        info = {"format_version": FORMAT_VERSION, "arguments": arguments,
                "model_config": config_dict(self.model_config),
                "tokenizer_fingerprint": builders.tokenizer_fingerprint(getattr(self, "tokenizer", None)),
                "mesh": {"devices": self.mesh.size, "shape": dict(self.mesh.shape)},  # a resume elsewhere warns
                DEFAULT_OPTIMIZER_KEY: builds_default_optimizer(self)}
        if task := merged_task_settings(self):  # compared on resume (`resume_checks`); none: no entry
            info["task_arguments"] = task
        if self.lora is not None:  # the config in use, whichever route set it: compared on resume (`lora_record`)
            info[LORA_CONFIG_KEY] = config_record(self.lora, self._arguments.lora_adapter_path)
        if schedule := getattr(self, "_schedule_record", None):  # compared on resume (`resume_checks.warn_changes`)
            info[SCHEDULE_KEY] = {**schedule, DEFAULT_SCHEDULE_MARK: applies_default_schedule(self)}
        if frozen := frozen_fingerprints(self):  # compared on resume (`restore_checks.check_frozen_entries`)
            info[FROZEN_FINGERPRINTS] = frozen
        return info if self.base_fingerprint is None else {**info, "base_fingerprint": self.base_fingerprint}

    def task_settings(self) -> dict[str, Any]:
        """This class's settings a resume must keep (JSON values: a tuple is recorded as a list; a path, a set or NaN
        is refused at set-up): a resume under other values is refused, naming them. Each class in the chain returns
        only its own; `run_info` merges them all, base classes first (a subclass's value wins for a name both use),
        so an override need not call `super()`."""
        return {}

    def check_task_settings(self) -> None:
        """At set-up, before any data or model work: a setting JSON cannot hold is refused now, not at the first
        save (`merged_task_settings`)."""
        merged_task_settings(self)

    def save_arguments(self) -> Path | None:
        """`arguments.json`: the run's arguments and `task_arguments`, as a rerun continues them (process 0)."""
        if not self.is_main_process:
            return None
        return save_arguments(rerun_arguments(self._arguments, task=self.running_task()), self._arguments.output_dir,
                              self.task_arguments)

    def running_task(self) -> str:
        """The task both records name for this trainer's class (`recorded_task`), decided once per trainer."""
        if (task := self.__dict__.get("_recorded_task")) is None:
            task = self.__dict__["_recorded_task"] = recorded_task(type(self), self._arguments.task)
        return task


def recorded_task(trainer_class: type, given: str) -> str:
    """The task that rebuilds `trainer_class` from the command line, for arguments.json and run_info: `given` where it
    builds that class (the CLI's run) or names a factory (which built this trainer, as far as can be told); else the
    class's own registered task (an SFTTrainer built in Python: 'sft'); else its 'package.module:Class' path, where
    the CLI can import it (a subclass defined in a module). A class defined in a script (`__main__`) or a function has
    neither: its nearest registered base class's task, whose arguments the file holds, with a note (INFO) that the
    CLI rebuilds that class, not this one."""
    built = _target(given)
    if built is trainer_class or (built is not None and not isinstance(built, type)):
        return given
    if (own := _registered_name(trainer_class)) is not None:
        return own
    module, name = trainer_class.__module__, trainer_class.__qualname__
    if module != "__main__" and "<locals>" not in name and _target(path := f"{module}:{name}") is trainer_class:
        return path
    base, task = next(((cls, task) for cls in trainer_class.__mro__[1:] if (task := _registered_name(cls) or (
        given if cls is built else None))), (None, given))
    # INFO, not a warning: every script's own subclass lands here, and its run is right; only a CLI rerun would differ.
    logger.info("arguments.json names task %r: `easytrain train --config` rebuilds %s from it, not %s, which it "
                   "cannot import (defined in %s). To rerun %s itself, define it in an importable module (the file "
                   "then names 'package.module:%s') or register it with @easytrain.register_task.", task,
                   getattr(base, "__name__", "that task's trainer"), trainer_class.__name__,
                   "a function" if "<locals>" in name else module, trainer_class.__name__, trainer_class.__name__)
    return task


def _registered_name(cls: type) -> str | None:
    """The task `cls` registered itself as (`@register_task` on the class, not inherited), while it still builds it."""
    mark = vars(cls).get("__easytrain_task__")
    return mark.name if isinstance(mark, Task) and _target(mark.name) is cls else None


def _target(task: str) -> Any:
    """What `--task task` builds, or None where it builds nothing (an unknown name, a plugin that fails to load)."""
    try:
        return resolve_task(task).target
    except Exception:  # noqa: BLE001 - a task the CLI could not load either: another name is sought
        return None


def merged_task_settings(trainer: Any) -> dict[str, Any]:
    """The `task_settings` of every class of `trainer`'s chain that defines one, base classes first, in their JSON
    form: what `run_info` records as `task_arguments`, and what a resume compares with the checkpoint's (decoded
    from JSON: a tuple read back is a list, an int key a string).

    Raises:
        ArgumentError: a value JSON cannot hold (a path, a set, NaN or infinity), naming the key and its class.
    """
    merged: dict[str, Any] = {}
    for cls in reversed(type(trainer).__mro__):
        if (own := vars(cls).get("task_settings")) is not None:
            merged.update(json_settings(own.__get__(trainer, type(trainer))(), f"{cls.__name__}.task_settings()"))
    return merged


def json_settings(settings: dict[str, Any], owner: str) -> dict[str, Any]:
    """`settings` as JSON gives them back, each key checked on its own so that a refusal names it."""
    if not isinstance(settings, Mapping):
        raise TypeError(f"{owner} returned a {type(settings).__name__}; return a dict of this class's settings "
                        "(name -> JSON value), {} for none.")
    form: dict[str, Any] = {}
    for key, value in settings.items():
        try:
            form[str(key)] = json.loads(json.dumps(value, allow_nan=False))
        except (TypeError, ValueError) as error:
            raise ArgumentError("task_settings", f"{owner} returned {key!r}: {value!r}, which JSON cannot hold "
                                f"({error}); each checkpoint records it and a resume compares it. Return a JSON "
                                f"value: {_json_fix(error)}.") from error
    return form


def _json_fix(error: Exception) -> str:
    if isinstance(error, ValueError) and "float" in str(error):  # NaN is never equal to itself: no resume matches it
        return "None (or a string such as 'nan') for a number that is unset or not finite"
    return ("str(path) for a path, a sorted list for a set; numbers, strings, booleans or None, in lists and dicts "
            "of them")


def frozen_fingerprints(trainer: Any) -> dict[str, Any]:
    """The digests of `trainer`'s fixed frozen entries (`FrozenPlan.fingerprints_as` while the model is configured,
    then the copy `configure_model` keeps), named as the resumed checkpoint's record names them (another
    `scan_layers` layout); empty before set-up or without such entries."""
    plan = getattr(trainer, "_frozen_plan", None)
    if plan is None:  # after set-up: the record `configure_model` kept (the plan is released with its values)
        return getattr(trainer, "_frozen_fingerprints", None) or {}
    return plan.fingerprints_as(lambda: stored_record(getattr(trainer, "_resume_from", None), FROZEN_FINGERPRINTS))


def builds_default_optimizer(trainer: Any) -> bool:
    """Whether `BaseTrainer.configure_optimizer` builds `trainer`'s optimizer from the arguments (not overridden):
    only then do `optimizer` and the settings that switch a part of its state tell the state's layout."""
    from easytrain.trainers.base import BaseTrainer  # base.py mixes RunRecordHooks in

    return getattr(trainer.configure_optimizer, "__func__", None) is BaseTrainer.configure_optimizer


def applies_default_schedule(trainer: Any) -> bool:
    """Whether the schedule `trainer` applies is the very one `BaseTrainer.configure_schedule` built (returned
    as is, e.g. of `2 * total_steps` updates): only then do its arguments and record tell its rate at each update; an
    override wrapping it may read the run's length whatever they say."""
    built = getattr(trainer, "_default_schedule", None)
    return built is not None and getattr(trainer, "_schedule", None) is built
