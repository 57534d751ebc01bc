"""Preference pairs as batches: ``[B, 2, T]`` rows (chosen, rejected) padded to a bucket, and per-pair
numeric columns (e.g. precomputed reference log-probs) carried through to the batch.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import datasets
import numpy as np

from easytrain.data.errors import DataError
from easytrain.data.lm import Batch
from easytrain.data.packing import BATCH_KEYS, PaddedCollate
from easytrain.data.preference_data import PAIR_COLUMNS


def pair_rows(tokenized: datasets.Dataset,
              extra: Mapping[str, np.ndarray | Sequence[float]] | None = None) -> datasets.Dataset:
    """The loader rows: tokenised pairs plus per-pair numeric columns that ``PairedCollate`` passes on.

    ``extra`` maps a column name to ``[N]`` or ``[N, 2]`` numbers (e.g. ``ref_chosen_logps`` and
    ``ref_rejected_logps``, or ``ref_logps`` as (chosen, rejected)); they reach the batch as ``[B]``
    or ``[B, 2]``. A column of that name already there is replaced (recomputed reference log-probs).

    Raises:
        DataError: Missing pair columns, a wrong length or shape, non-numbers, NaN or inf.
    """
    missing = [name for name in PAIR_COLUMNS[1:5] if name not in tokenized.column_names]
    if missing:
        raise DataError(f"The rows lack {missing}; make them with `tokenize_preference_dataset` first.")
    for name, values in (extra or {}).items():
        array = _extra_array(name, values, len(tokenized))
        if not np.isfinite(array).all():
            bad = int(np.flatnonzero(~np.isfinite(array.reshape(len(array), -1)).all(1))[0])
            raise DataError(f"Column {name!r} has NaN or inf at pair {bad}; recompute it before training.")
        if name in tokenized.column_names:
            tokenized = tokenized.remove_columns(name)
        value = datasets.Value("float32" if array.dtype.kind == "f" else "int64")
        feature = value if array.ndim == 1 else datasets.List(value, length=2)
        tokenized = tokenized.add_column(name, array.tolist(), feature=feature)
    return tokenized


class PairedCollate:
    """Pairs as rows: ``[B, 2, T]`` arrays (index 0 chosen, 1 rejected), right-padded to a bucket.

    Keys: ``input_ids``, ``targets`` (next token), ``loss_mask`` (float, 1 where the target is a
    supervised completion token), ``segment_ids``, ``positions``, ``attention_mask`` (all
    ``[B, 2, T]``), ``example_id`` ``[B]``, plus every other numeric column of the rows as ``[B]``
    or ``[B, 2]`` (see ``pair_rows``). T is the smallest bucket holding the batch's longest
    sequence, so one compilation per bucket. A pair is one row, so gradient accumulation and data
    parallelism never split it; rows with ``example_id < 0`` get an all-zero ``loss_mask``.
    """

    def __init__(self, buckets: Sequence[int], pad_id: int = 0) -> None:
        """Args: buckets: allowed lengths T (positions, i.e. tokens - 1); pad_id: filler id."""
        self._padded = PaddedCollate(buckets, pad_id)
        self.buckets, self.pad_id = self._padded.buckets, self._padded.pad_id

    def __call__(self, rows: Mapping[str, np.ndarray], example_ids: np.ndarray) -> Batch:
        interleaved = {  # row 2b is pair b's chosen, row 2b + 1 its rejected
            key: [seq for pair in zip(rows[f"chosen_{key}"], rows[f"rejected_{key}"], strict=True) for seq in pair]
            for key in ("input_ids", "loss_mask")}
        example_ids = np.asarray(example_ids, np.int32)
        flat = self._padded(interleaved, np.repeat(example_ids, 2))
        batch = {key: value.reshape(len(example_ids), 2, -1) for key, value in flat.items()
                 if key != "example_id"}
        batch["example_id"] = example_ids
        for name in rows:
            if name not in PAIR_COLUMNS:
                batch[name] = _extra_array(name, rows[name], len(example_ids))
        return batch


def _extra_array(name: str, values: Any, rows: int) -> np.ndarray:
    """A per-pair numeric column as ``[rows]`` or ``[rows, 2]`` float32/int32."""
    array = np.asarray(values)
    if array.dtype == object:  # a column of equal-length arrays read from Arrow
        try:
            array = np.stack([np.asarray(value) for value in array])
        except ValueError:
            pass
    if name in BATCH_KEYS or array.dtype.kind not in "biuf" or array.shape not in ((rows,), (rows, 2)):
        raise DataError(
            f"Column {name!r} ({array.dtype}, shape {array.shape}) cannot join a batch of {rows} "
            "pairs: extra columns must be numbers, one or two (chosen, rejected) per pair, and not "
            f"named like a batch key {BATCH_KEYS}; remove or rename it (`dataset.remove_columns`)."
        )
    return array.astype(np.float32 if array.dtype.kind == "f" else np.int32)
