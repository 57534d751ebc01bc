"""The record a checkpoint's ``progress`` item keeps of what it was saved at (``SAVED_AT``): the loop's step (its
directory's name) and the train state's own ``step``, which counts optimizer updates (several per loop step where
``train_iteration`` runs more), so a resume can tell the state it restores is that checkpoint's without assuming
one update per step."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

#: The `progress` entry recording what a checkpoint was saved at.
SAVED_AT = "saved_at"


def saved_at(step: int, state: Any) -> dict[str, int]:
    """The `SAVED_AT` record of `state` saved as `step` (no `state_step` for a state without a `step`)."""
    updates = getattr(state, "step", None)
    return {"step": int(step)} | ({} if updates is None else {"state_step": int(updates)})


def recorded_updates(progress: Mapping[str, Any], step: int) -> int | None:
    """The train state's step recorded in the `progress` of checkpoint `step`; None where nothing was recorded (a
    checkpoint written before the record, or a state without a `step`).

    Raises:
        ValueError: the record is of another step (a renamed or mixed-up step directory), or damaged.
    """
    if (record := progress.get(SAVED_AT)) is None:
        return None
    if not isinstance(record, Mapping) or type(record.get("step")) is not int or \
            type(record.get("state_step", 0)) is not int:
        raise ValueError(f"its progress records a damaged {SAVED_AT} entry: {record!r}")
    if record["step"] != step:
        raise ValueError(f"its progress records step {record['step']}, but this is the checkpoint of step {step}")
    return record.get("state_step")
