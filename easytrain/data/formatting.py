"""A user's ``formatting_func``, checked row by row: a wrong return shape is a row error naming it.

Without the check, a function returning a string (as TRL's formatting functions do) fails inside
``datasets`` with a ``TypeError`` about "the provided function", and one returning ``None`` or a dict with
other keys silently leaves columns no format recognises, so the error blames the data's columns.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import datasets

from easytrain.data.errors import DataError
from easytrain.data.row_errors import at_row

FormattingFunc = Callable[[Mapping[str, Any]], Mapping[str, Any]]


def apply_formatting(dataset: datasets.Dataset, formatting_func: FormattingFunc,
                     formats: Mapping[str, Sequence[str]], num_proc: int | None) -> datasets.Dataset:
    """``dataset`` mapped through ``formatting_func``, each result checked to be a dict fitting one of ``formats``.

    Raises:
        RowError: A result is not a dict, or has none of the column sets of ``formats``; names the row.
    """
    checked = functools.partial(_formatted, formatting_func=formatting_func, formats=formats)
    return dataset.map(checked, with_indices=True, remove_columns=dataset.column_names, num_proc=num_proc,
                       desc="Formatting")


def _formatted(example: Mapping[str, Any], index: int, *, formatting_func: FormattingFunc,
               formats: Mapping[str, Sequence[str]]) -> Mapping[str, Any]:
    with at_row(index):
        result = formatting_func(example)
        if isinstance(result, Mapping) and any(set(columns) <= set(result) for columns in formats.values()):
            return result
        expected = "; ".join(f"{{{', '.join(columns)}}} ({name})" for name, columns in formats.items())
        if isinstance(result, Mapping):
            got = f"a dict with keys {sorted(map(str, result))}"
        else:
            got = f"{type(result).__name__} {str(result)[:60]!r}"
        hint = " Wrap a string in a dict: return {'text': ...}." if isinstance(result, str) and "text" in \
            {column for columns in formats.values() for column in columns} else ""
        raise DataError(f"`formatting_func` returned {got} for this row; it must return a dict with the keys of "
                        f"one of: {expected}.{hint}")
