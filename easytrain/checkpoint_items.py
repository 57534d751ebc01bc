"""Which items a checkpoint was written with, so that a missing one reads as damage, not as an older checkpoint.

``fingerprint`` and ``progress`` were added after the first checkpoints were written, which lack them and still
resume. Orbax's ``_CHECKPOINT_METADATA`` of each step names the items it was saved with (its item handlers): where
it names one of them, that item must be there. Without this, deleting ``fingerprint/`` would turn the integrity
check off (a damaged array would train as NaN), and deleting ``progress/`` would silently reset callback state
such as early stopping's patience.
"""

from __future__ import annotations

import json
from pathlib import Path

from easytrain.errors import EasytrainError

#: Orbax's per-step metadata file, listing the step's items.
ORBAX_METADATA = "_CHECKPOINT_METADATA"
#: Items later easytrain versions write: required where the step's metadata lists them.
LATER_ITEMS = ("fingerprint", "progress")


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


def present(step_dir: Path, item: str) -> bool:
    """Whether ``item`` of ``step_dir`` can be read: False for a checkpoint written before the item existed.

    Raises:
        MissingItemError: the step's metadata lists ``item`` but its directory is gone.
    """
    if (step_dir / item).is_dir():
        return True
    if item in (listed_items(step_dir) or ()):
        raise MissingItemError(f"its {item}/ item is missing, though its {ORBAX_METADATA} lists it (the "
                               "checkpoint was written with it: deleted or lost since)")
    return False


def check_later_items(step_dir: Path) -> None:
    """Refuse ``step_dir`` if an item its metadata lists (``LATER_ITEMS``) is missing, before any array is read."""
    for item in LATER_ITEMS:
        present(step_dir, item)
