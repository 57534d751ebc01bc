"""Which items a checkpoint was written with, so that a missing one reads as damage, not as an older checkpoint.

Every checkpoint records the names of its items in its run_info (``RECORD_KEY``, written and hidden by
`easytrain.checkpoint.CheckpointManager`): an item whose directory is gone is refused before any array is read,
even where its entry in Orbax's ``_CHECKPOINT_METADATA`` went with it (a partial copy or rsync, a clean-up by
hand). run_info itself cannot go unnoticed: a step directory without it is not a checkpoint.

``fingerprint`` and ``progress`` were added after the first checkpoints were written, which lack them and still
resume; so do checkpoints written before the record. For those, Orbax's metadata (its item handlers) is what
names the items the step was saved with: where it names one of them, that item must be there. Without these
checks, deleting ``fingerprint/`` would turn the integrity check off (a damaged array would train as NaN), and
deleting ``progress/`` would silently reset callback state such as early stopping's patience.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Collection, Iterable, Mapping
from pathlib import Path
from typing import Any

from easytrain.checkpoint_dirs import CheckpointNotFoundError, is_checkpoint
from easytrain.errors import EasytrainError

#: Orbax's per-step metadata file, listing the step's items.
ORBAX_METADATA = "_CHECKPOINT_METADATA"
#: Items later easytrain versions write: required where the step's metadata lists them.
LATER_ITEMS = ("fingerprint", "progress")
#: The run_info key under which a checkpoint records the items it was saved with.
RECORD_KEY = "_checkpoint_items"
#: The file Orbax's JSON handler keeps an item's JSON in, in the item's directory.
JSON_FILE = "metadata"
#: Where the run_info item keeps its JSON.
RUN_INFO_FILE = Path("run_info") / JSON_FILE
#: What reading a checkpoint's JSON raises where the checkpoint, not the code, is at fault: a file that cannot be
#: opened or read (`OSError`: gone, denied, a directory in its place) or text that is not the JSON expected
#: (`ValueError`: bad or truncated JSON, bytes that are not UTF-8, no JSON object). A `KeyError` or `TypeError` is
#: the reader's own bug, never taken for damage.
READ_ERRORS = (OSError, ValueError)


class MissingItemError(EasytrainError, FileNotFoundError):
    """An item the checkpoint was written with is gone (deleted or lost): the checkpoint is damaged."""


def listed_items(step_dir: Path) -> frozenset[str] | None:
    """The items ``step_dir``'s Orbax metadata says it was saved with; None where it records none.

    Raises:
        json.JSONDecodeError: the metadata file is not valid JSON (a damaged checkpoint).
    """
    path = step_dir / ORBAX_METADATA
    if not path.is_file():
        return None
    metadata = json.loads(path.read_bytes())
    handlers = metadata.get("item_handlers") if isinstance(metadata, dict) else None
    return frozenset(handlers) if isinstance(handlers, dict) else None


def read_json(step_dir: Path, item: str) -> Any:
    """The JSON of ``step_dir``'s ``item`` as Orbax's JSON handler reads it (the same error where the file is gone),
    without an Orbax manager: one file read, where a manager would first list the directory's checkpoints.

    Raises:
        FileNotFoundError: the item's file is missing.
        json.JSONDecodeError: it is not valid JSON (a damaged checkpoint).
    """
    path = step_dir / item / JSON_FILE
    if not path.exists():
        raise FileNotFoundError(f"File {path} not found.")
    return json.loads(path.read_text())


def stored_run_info(step_dir: Path) -> dict[str, Any]:
    """The run_info of the complete checkpoint ``step_dir`` as its run saved it (`without_record`): its JSON alone.

    Raises:
        CheckpointNotFoundError: ``step_dir`` is not a complete checkpoint.
        FileNotFoundError, json.JSONDecodeError: as `read_json`.
        ValueError: it holds no JSON object (`without_record`).
    """
    if not is_checkpoint(step_dir):
        raise CheckpointNotFoundError(f"{step_dir} is not a complete checkpoint")
    return without_record(read_json(step_dir, "run_info"))


def recorded_items(step_dir: Path) -> frozenset[str] | None:
    """The items ``step_dir``'s run_info records it was saved with (`record_of`); None for a checkpoint written before
    the record (or one whose run_info is gone: a step without it is no checkpoint, and its reader reports that).

    Raises:
        MissingItemError: the record is damaged.
        json.JSONDecodeError: run_info is not valid JSON (a damaged checkpoint).
    """
    path = step_dir / RUN_INFO_FILE
    return record_of(json.loads(path.read_bytes()), step_dir) if path.is_file() else None


def record_of(run_info: Any, step_dir: Path) -> frozenset[str] | None:
    """The items the run_info JSON of ``step_dir`` records it was saved with; None where it records none.

    Raises:
        MissingItemError: the record is not a list of names (an edited or damaged run_info).
    """
    if not isinstance(run_info, dict) or RECORD_KEY not in run_info:
        return None
    record = run_info[RECORD_KEY]
    if not isinstance(record, list) or not all(isinstance(name, str) for name in record):
        raise MissingItemError(f"checkpoint step {step_dir.name}: the record of its items in run_info "
                               f"({RECORD_KEY}: {record!r}) is damaged, so nothing shows which items it must have. "
                               f"It was left untouched; restore {step_dir / RUN_INFO_FILE} from a backup, or resume "
                               "another step.")
    return frozenset(record)


def with_record(run_info: Mapping[str, Any], items: Iterable[str]) -> dict[str, Any]:
    """``run_info`` with the names of the items saved beside it recorded (``RECORD_KEY``)."""
    if RECORD_KEY in run_info:
        raise ValueError(f"run_info key {RECORD_KEY!r} is reserved for the checkpoint's record of its items; "
                         "rename that entry")
    return {**run_info, RECORD_KEY: sorted(items)}


def without_record(run_info: Mapping[str, Any]) -> dict[str, Any]:
    """``run_info`` as its caller saved it: the record of items is the checkpoint's own bookkeeping.

    Raises:
        ValueError: it is not a JSON object (a damaged or overwritten run_info).
    """
    if not isinstance(run_info, Mapping):
        raise ValueError(f"its run_info is not a JSON object (it holds a {type(run_info).__name__})")
    return {key: value for key, value in run_info.items() if key != RECORD_KEY}


def required_items(step_dir: Path, recorded: frozenset[str] | None) -> tuple[frozenset[str], str]:
    """The items ``step_dir`` must have, and what says so: its run_info's record (``recorded``, `recorded_items`), or,
    for a checkpoint written before it, those of ``LATER_ITEMS`` that its Orbax metadata lists (the others a reader
    requires anyway)."""
    if recorded is not None:
        return recorded, f"its run_info's {RECORD_KEY}"
    return frozenset(LATER_ITEMS) & (listed_items(step_dir) or frozenset()), f"its {ORBAX_METADATA}"


Steps = Collection[int] | Callable[[], Collection[int]]


def _missing(step_dir: Path, item: str, source: str, steps: Steps) -> MissingItemError:
    """The refusal of a checkpoint that lacks ``item``: which step, what was lost, and how to go on. ``steps``: the
    checkpoints beside it, or how to list them (only a refusal needs them)."""
    steps = steps() if callable(steps) else steps
    there = f" (checkpoints there: {', '.join(map(str, steps))})" if steps else ""
    return MissingItemError(
        f"checkpoint step {step_dir.name}: its {item}/ item is missing, though it was saved with it ({source} lists "
        f"it): deleted, or lost in a partial copy. Nothing was loaded and the checkpoint was left untouched. Copy "
        f"{step_dir / item} back from a backup or from the run it was copied from, or resume from another "
        f"step{there}.")


def present(step_dir: Path, item: str, steps: Steps = ()) -> bool:
    """Whether ``item`` of ``step_dir`` can be read: False for a checkpoint written before the item existed.
    ``steps``: the checkpoints beside it, named in a refusal.

    Raises:
        MissingItemError: the step was saved with ``item`` (`required_items`) but it is gone.
    """
    if (step_dir / item).is_dir():
        return True
    required, source = required_items(step_dir, recorded_items(step_dir))
    if item in required:
        raise _missing(step_dir, item, source, steps)
    return False


def check_items(step_dir: Path, recorded: frozenset[str] | None, steps: Steps = ()) -> None:
    """Refuse ``step_dir`` before any array is read if an item it was saved with (`required_items`, given its
    run_info's ``recorded`` items) is missing."""
    required, source = required_items(step_dir, recorded)
    for item in sorted(required):
        if not (step_dir / item).is_dir():
            raise _missing(step_dir, item, source, steps)
