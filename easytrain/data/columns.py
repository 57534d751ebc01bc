"""Which data format a dataset's columns select, with one error for when none does."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from easytrain.data.errors import DataError


def format_from_columns(column_names: Sequence[str], formats: Mapping[str, Sequence[str]], *, kind: str,
                        fix: str, hint: str = "") -> str:
    """The first format whose required columns are all present (in `formats`' order).

    Raises:
        DataError: No format fits; the message lists the columns found, those each format needs, and `fix`.
    """
    names = set(column_names)
    for data_format, required in formats.items():
        if names.issuperset(required):
            return data_format
    expected = "; ".join(f"{{{', '.join(cols)}}} ({fmt})" for fmt, cols in formats.items())
    raise DataError(f"Cannot tell the {kind} data format from the columns {sorted(names) or 'none'}; expected "
                    f"one of: {expected}.{hint} {fix}")
