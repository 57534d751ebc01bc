"""What a saved data position depends on, and how one is compared with a loader before it is restored.

A position is a global step plus the settings that decide which rows that step holds: the seed, the global batch
size, the number of rows and, since it was recorded, a digest of the rows' content (`easytrain.data.digest`); and,
beside them, a record of the rows' float columns, which pick no example and are only reported on
(`easytrain.data.float_digest`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from easytrain.data.errors import DataError

#: The rows' content digest a position also records; compared where both sides have it (a position saved before
#: it was recorded has none).
DIGEST_KEY = "data_digest"
#: The record of the rows' float columns a position also keeps (`easytrain.data.float_digest`): never one of the
#: compared settings (float values pick no example), only reported on when the position is restored.
FLOATS_KEY = "data_floats"


def compared_keys(state: Mapping[str, Any], fingerprint: Mapping[str, Any]) -> tuple[str, ...]:
    """The settings a saved position and a loader are compared on: every one the loader's `fingerprint` records
    (`TrainBatches.fingerprint`: seed, global batch size, row count, digest), the digest only where the saved
    position has one too (a position saved before digests were recorded)."""
    return tuple(key for key in fingerprint if key != FLOATS_KEY and (key != DIGEST_KEY or DIGEST_KEY in state))


def position_mismatch(state: Mapping[str, Any], fingerprint: Mapping[str, Any]) -> list[str]:
    """How a saved data position's settings differ from a loader's (`"num_rows: saved 775 vs now 1038"`)."""
    return [f"{key}: saved {state.get(key)!r} vs now {fingerprint.get(key)!r}"
            for key in compared_keys(state, fingerprint) if state.get(key) != fingerprint.get(key)]


def check_same_settings(state: Mapping[str, Any], fingerprint: Mapping[str, Any]) -> None:
    """Refuse a saved position recorded for other settings or rows: the same step would hold other examples."""
    if (diffs := position_mismatch(state, fingerprint)) or "step" not in state:
        keys = compared_keys(state, fingerprint)
        saved, now = ({key: settings.get(key) for key in keys} for settings in (state, fingerprint))
        raise DataError(
            f"The data state was saved with {saved} but this loader has {now} "
            f"({'; '.join(diffs) or 'no step recorded'}): the same step would hold other examples. Resume with "
            "the same dataset, seed and global_batch_size, or pass --allow_data_order_change to start the data "
            "order afresh at the resumed step (not an exact continuation)."
        )
