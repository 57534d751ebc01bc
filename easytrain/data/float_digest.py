"""A record of the training rows' floating-point columns (loss weights, precomputed reference log-probs), kept in a
saved data position beside the rows' digest, and compared with tolerance when that position is restored.

Why not in the digest (`easytrain.data.digest`), which refuses a resume over other rows: float columns pick no
example (the position means the same examples whatever they hold), and a run's own (reference log-probs
recomputed on other hardware, or in another reduction order) differ in their last bits. Rounding before hashing
does not fix that: among millions of values some sit within a last bit of a rounding boundary, so a rounded hash
differs on nearly every benign recomputation, and a refusal there would stop resumes that are exact in all that
matters. So each float column (a path, as the digest names it) is recorded as:

* an exact SHA-256 of its values (widened to float64, NaN and nulls as one NaN) and of the row each belongs to:
  equal means identical, and nothing is said;
* per contiguous block of rows (`BLOCKS` of them), the sum, the sum of magnitudes and the sum of squares (float64):
  a per-value change of relative size `d` moves them by at most `d` (`2d + d^2` for squares) of their magnitude,
  so differences within `RTOL` of it are last-bit noise (logged at info level), and larger ones (an edited
  weight, log-probs of another reference model, a column added or removed) are a warning naming the column.

Neither refuses, with or without `allow_data_order_change`: the resumed run continues at the same examples, and
the warning says it trains on the new values (like a changed learning-rate schedule, which also only warns). An
edit too small and sparse to move a block's sums by `RTOL` is logged at info level as noise: a fixed-size record
can tell a sparse small edit from noise only by an exact hash, which noise also changes.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Mapping
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

logger = logging.getLogger("easytrain")

#: Contiguous row blocks each float column's sums are kept for: an edit of a range of rows moves its block's sums.
BLOCKS = 16
#: Relative difference of a block's sums (to its magnitude) up to which float values count as recomputation noise.
RTOL = 1e-3
_SUMS = ("sum", "abs", "squares")


class _Column:
    """One float column's exact hashes and per-block sums, fed chunk by chunk in row order."""

    def __init__(self) -> None:
        self.rows_hash, self.values_hash = hashlib.sha256(), hashlib.sha256()
        self.count = self.nonfinite = 0
        self.sums = {name: np.zeros(BLOCKS) for name in _SUMS}

    def add(self, rows: np.ndarray, values: np.ndarray, rows_per_block: int) -> None:
        values = np.asarray(values, dtype=np.float64).reshape(-1)
        finite = np.isfinite(values)
        canonical = np.where(np.isnan(values), np.nan, values)  # one NaN bit pattern, nulls included
        self.rows_hash.update(np.ascontiguousarray(rows, dtype="<i8").data)
        self.values_hash.update(np.ascontiguousarray(canonical, dtype="<f8").data)
        self.count += len(values)
        self.nonfinite += int(len(values) - finite.sum())
        blocks = np.minimum(np.asarray(rows, np.int64) // rows_per_block, BLOCKS - 1)
        kept = np.where(finite, values, 0.0)
        for name, weights in zip(_SUMS, (kept, np.abs(kept), kept * kept), strict=True):
            self.sums[name] += np.bincount(blocks, weights=weights, minlength=BLOCKS)

    def record(self) -> dict[str, Any]:
        both = f"{self.rows_hash.hexdigest()}{self.values_hash.hexdigest()}".encode()
        return {"sha256": hashlib.sha256(both).hexdigest()[:32], "count": self.count, "nonfinite": self.nonfinite,
                **{name: sums.tolist() for name, sums in self.sums.items()}}


class FloatColumns:
    """The float columns of rows being digested, by path; `record()` is what a data position keeps."""

    def __init__(self, num_rows: int) -> None:
        self._rows_per_block = max(1, -(-num_rows // BLOCKS))
        self._columns: dict[str, _Column] = {}

    def add(self, path: str, rows: np.ndarray, values: np.ndarray) -> None:
        """`values` and the row (for nested parts: the element of `path`) each belongs to, in row order."""
        self._columns.setdefault(path, _Column()).add(rows, values, self._rows_per_block)

    def add_numpy(self, path: str, column: np.ndarray, start: int) -> None:
        """An `[N, ...]` float array, rows `start` to `start + N`."""
        width = int(np.prod(column.shape[1:], dtype=np.int64))
        self.add(path, np.repeat(np.arange(start, start + len(column)), width), column.reshape(-1))

    def add_arrow(self, path: str, array: pa.Array, start: int) -> None:
        """A float (or nested list of floats) Arrow array, rows `start` to `start + len(array)`."""
        rows = np.arange(start, start + len(array))
        array = array.dictionary_decode() if pa.types.is_dictionary(array.type) else array
        while not pa.types.is_floating(array.type):
            rows = rows[np.asarray(pc.list_parent_indices(array), dtype=np.int64)]
            array = pc.list_flatten(array)
            array = array.dictionary_decode() if pa.types.is_dictionary(array.type) else array
        self.add(path, rows, array.to_numpy(zero_copy_only=False))  # nulls read as NaN

    def record(self) -> dict[str, dict[str, Any]]:
        return {path: column.record() for path, column in sorted(self._columns.items())}


def float_changes(saved: Mapping[str, Any], now: Mapping[str, Any]) -> tuple[list[str], list[str]]:
    """`(changed, noise)`: descriptions of the float columns that differ beyond `RTOL`, and of those that differ
    within it (last-bit noise), between a saved record and this loader's."""
    changed, noise = [], []
    for path in sorted(saved.keys() | now.keys()):
        before, after = saved.get(path), now.get(path)
        if before is None or after is None:
            changed.append(f"{path!r} ({'absent in the checkpoint' if before is None else 'absent now'})")
        elif before.get("sha256") != after.get("sha256"):
            problem = _beyond_noise(before, after)
            (changed if problem else noise).append(f"{path!r}{f' ({problem})' if problem else ''}")
    return changed, noise


def _beyond_noise(before: Mapping[str, Any], after: Mapping[str, Any]) -> str | None:
    """How two records of one column differ beyond recomputation noise, or None if they do not."""
    for key in ("count", "nonfinite"):
        if before.get(key) != after.get(key):
            return f"{key} {before.get(key)} vs now {after.get(key)}"
    try:
        old, new = ({name: np.asarray(record[name], np.float64) for name in _SUMS} for record in (before, after))
    except (KeyError, TypeError, ValueError):
        return "a record this easytrain cannot read"
    magnitude = np.maximum(old["abs"], new["abs"])
    bounds = {"sum": RTOL * magnitude, "abs": RTOL * magnitude,
              "squares": (2 * RTOL + RTOL**2) * np.maximum(old["squares"], new["squares"])}
    for name in _SUMS:
        if len(old[name]) != len(new[name]):
            return "a record of another layout"
        if (outside := np.flatnonzero(np.abs(old[name] - new[name]) > bounds[name] + 1e-300)).size:
            block = int(outside[0])
            return (f"row block {block + 1} of {len(old[name])}: {name} {old[name][block]:.6g} "
                    f"vs now {new[name][block]:.6g}")
    return None


def report_float_changes(saved: Mapping[str, Any] | None, now: Mapping[str, Any] | None) -> None:
    """Log how the float columns differ from a restored position's (nothing when either side has no record)."""
    if not isinstance(saved, Mapping) or now is None:
        return
    changed, noise = float_changes(saved, now)
    if changed:
        logger.warning("the float columns of the training rows changed since the checkpoint (%s): they pick no "
                       "example, so the data position is kept, but the resumed run trains on the new values; "
                       "restore the old ones for an exact continuation", "; ".join(changed))
    if noise:
        logger.info("the float columns %s of the training rows differ from the checkpoint's within %g of their "
                    "magnitude, as values recomputed on other hardware do: resuming as saved", ", ".join(noise), RTOL)
