"""Random access to a data source's rows by index, for the loaders' reader threads: a `datasets.Dataset` or equal-length
columns, checked once (a column whose rows differ in shape is named), with small numeric datasets formatted once."""

from __future__ import annotations

import threading
from collections.abc import Mapping
from typing import Any, TypeAlias

import datasets
import numpy as np

from easytrain.data.errors import DataError

#: A source addressable by row index: a ``datasets.Dataset`` or equal-length columns.
RowSource: TypeAlias = datasets.Dataset | Mapping[str, np.ndarray]


class RowReader:
    """Random access to rows by index list, counting the rows fetched.

    A `datasets.Dataset` is read through its numpy format, which costs about 90 us of Python per batch
    (in the loader's threads, beside the training loop's own). A dataset whose columns all format as numeric
    numpy arrays of at most `_COPY_LIMIT` bytes together is formatted once, at the first read, and rows are
    taken from those arrays (the same values and dtypes, `tests/test_loader.py`); a tiny model's step is
    that much shorter (`benchmarks/host_overhead.py`). Larger datasets, and columns of strings or of rows of
    different lengths, are formatted batch by batch as before; so is every dataset without `whole_copy` (the
    loaders pass it in one process only: over several, each reads only its own rows).
    """

    def __init__(self, source: RowSource, whole_copy: bool = False) -> None:
        if isinstance(source, datasets.Dataset):
            self._source: Any = source.with_format("numpy")
            self._num_rows = len(source)
        elif isinstance(source, Mapping):
            self._source = {name: _column_array(name, column) for name, column in source.items()}
            self._num_rows = _common_length(self._source)
        else:
            raise DataError(
                f"The data source must be a datasets.Dataset or a mapping of column "
                f"arrays, got {type(source).__name__}."
            )
        self._lock = threading.Lock()
        self._rows_read = 0
        self._copy_decided = not (whole_copy and isinstance(self._source, datasets.Dataset))  # else: at the first read

    def __len__(self) -> int:
        return self._num_rows

    @property
    def rows_read(self) -> int:
        return self._rows_read

    def read(self, indices: np.ndarray) -> dict[str, np.ndarray]:
        with self._lock:
            self._rows_read += len(indices)
            if not self._copy_decided:
                self._source, self._copy_decided = _numeric_columns(self._source) or self._source, True
        if isinstance(self._source, datasets.Dataset):
            return dict(self._source[indices.tolist()])
        return {name: column[indices] for name, column in self._source.items()}


#: Bytes of numpy columns up to which a `datasets.Dataset` is formatted once rather than batch by batch: 8M
#: tokens as int64, formatted in about 0.25 s at the first read (in the loader's threads, while the step compiles).
_COPY_LIMIT = 64 * 2**20


def _numeric_columns(dataset: datasets.Dataset) -> dict[str, np.ndarray] | None:
    """Every column of `dataset` (in numpy format) as one numeric array with a row per example, or None if the
    Arrow data exceeds `_COPY_LIMIT`, holds nulls, or a column formats otherwise (strings, rows of different
    lengths)."""
    table = dataset.data  # the whole underlying table: a bound for a selection of its rows
    if table.nbytes > _COPY_LIMIT // 2 or any(column.null_count for column in table.columns):
        return None  # (integer columns format as int64: up to twice the Arrow bytes)
    columns = dict(dataset[:])
    regular = all(isinstance(column, np.ndarray) and column.dtype.kind in "biuf" and len(column) == len(dataset)
                  for column in columns.values())
    return columns if regular and sum(column.nbytes for column in columns.values()) <= _COPY_LIMIT else None


def _column_array(name: str, column: Any) -> np.ndarray:
    """`column` as one numpy array, or a DataError naming it when its rows differ in shape (numpy's own error
    names neither the column nor the fix). A numpy object array passes as it is: its rows reach `collate`."""
    try:
        return np.asarray(column)
    except ValueError as error:
        unstacked = error
    shapes = list(dict.fromkeys(map(_row_shape, column)))
    if len(shapes) < 2:
        raise unstacked
    raise DataError(
        f"Data column {name!r} holds rows of different shapes ({', '.join(shapes[:3])}{', ...' * (len(shapes) > 3)}), "
        "but every batch needs one shape: pad them in collate to a fixed length and pass a mask (collate gets the "
        "rows as they are from a numpy object array, one entry a row, or a datasets.Dataset), or pad them in "
        "prepare_datasets; docs/custom_trainer.md, 'Static shapes'.")


def _row_shape(row: Any) -> str:
    """A row's shape as shown in the error; "ragged" for a row whose own parts differ in shape."""
    try:
        return str(np.shape(row))
    except ValueError:
        return "ragged"


def _common_length(columns: Mapping[str, np.ndarray]) -> int:
    lengths = {name: len(column) for name, column in columns.items()}
    if len(set(lengths.values())) != 1:
        raise DataError(
            f"Data source columns must be non-empty and of equal length, got {lengths}."
        )
    return next(iter(lengths.values()))
