"""What a run records beside its arrays (mixed into `BaseTrainer`): the `run_info` each checkpoint carries, so a
resume can be checked before any array is read, `arguments.json` in `output_dir`, so a rerun continues the same
job, and the checkpoint manager that writes the checkpoints.

A trainer's own settings a resume must keep come from `task_settings()`, merged over the class chain by
`run_info` (`merged_task_settings`): an override returns only its class's settings and cannot drop a parent's, as a
`run_info` override replacing `task_arguments` would (SFT's packing and masking settings under a subclass).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from easytrain.checkpoint import CheckpointManager
from easytrain.config_io import save_arguments
from easytrain.errors import ArgumentError
from easytrain.trainers import builders
from easytrain.trainers.lora_record import LORA_CONFIG_KEY, config_record
from easytrain.trainers.resume_checks import DEFAULT_OPTIMIZER_KEY, FORMAT_VERSION, config_dict
from easytrain.trainers.run_dir import rerun_arguments


class RunRecordHooks:
    """`checkpoint_manager`, `run_info` (a task trainer adds its own entries with `super().run_info()`), its
    `task_settings` (checked at set-up: `check_task_settings`) and `save_arguments`."""

    def checkpoint_manager(self) -> CheckpointManager:
        self._checkpoints = self._checkpoints or builders.checkpoint_manager(self._arguments)
        return self._checkpoints

    def run_info(self) -> dict[str, Any]:
        """Everything besides arrays that a checkpoint must carry to be resumed or audited."""
        info = {"format_version": FORMAT_VERSION, "arguments": self._arguments.to_dict(),
                "model_config": config_dict(self.model_config),
                "tokenizer_fingerprint": builders.tokenizer_fingerprint(getattr(self, "tokenizer", None)),
                "mesh": {"devices": self.mesh.size, "shape": dict(self.mesh.shape)},  # a resume elsewhere warns
                DEFAULT_OPTIMIZER_KEY: builds_default_optimizer(self)}
        if task := merged_task_settings(self):  # compared on resume (`resume_checks`); none: no entry
            info["task_arguments"] = task
        if self.lora is not None:  # the config in use, whichever route set it: compared on resume (`lora_record`)
            info[LORA_CONFIG_KEY] = config_record(self.lora, self._arguments.lora_adapter_path)
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
        return save_arguments(rerun_arguments(self._arguments), self._arguments.output_dir, self.task_arguments)


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


def builds_default_optimizer(trainer: Any) -> bool:
    """Whether `BaseTrainer.configure_optimizer` builds `trainer`'s optimizer from the arguments (not overridden):
    only then do `optimizer` and the settings that switch a part of its state tell the state's layout."""
    from easytrain.trainers.base import BaseTrainer  # base.py mixes RunRecordHooks in

    return getattr(trainer.configure_optimizer, "__func__", None) is BaseTrainer.configure_optimizer
