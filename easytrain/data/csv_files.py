""".csv files read as written: every column as text, a header row that names each column once, and no row longer
than the header (which pandas would read with every cell shifted one column), refused by file and line."""

from __future__ import annotations

import _csv
import contextlib
import csv
import os
from collections.abc import Iterator, Mapping

import datasets

from easytrain.data.errors import DataError, error_reason


def csv_text_features(data_files: Mapping[str, str], train: str, rows_checked: str | None = None) -> datasets.Features:
    """Every column of the .csv files as text, so a cell reads as written: left to infer, the builder turns
    all-numeric columns into numbers (`011` -> 11, `0012` -> 12.0), which text and chat data cannot use. The files
    share one set of columns (in any order: cells are matched to columns by name).

    `rows_checked`: a marker file in the files' own cache folder (`sources.local_files_cache`, named by their size,
    inode and change times): once it exists the rows of these very files passed the check, so a later start (a
    resume) reads their headers only instead of every row again (2.3 s for 196 MB on 2 busy Xeon cores)."""
    check_rows = rows_checked is None or not os.path.exists(rows_checked)
    headers = {split: csv_header(path, f"{split}_file", check_rows) for split, path in data_files.items()}
    for split, header in headers.items():
        if set(header) != set(headers[train]):
            raise DataError(
                f"`train_file` {data_files[train]!r} has the columns {headers[train]} but `{split}_file` "
                f"{data_files[split]!r} has {header}; give both files the same header row."
            )
    if check_rows and rows_checked is not None:
        os.makedirs(os.path.dirname(rows_checked), exist_ok=True)
        with open(rows_checked, "w"):
            pass
    return datasets.Features({name: datasets.Value("string") for name in headers[train]})


def csv_header(path: str, argument: str, check_rows: bool = True) -> list[str]:
    """The column names in a .csv file's header row (its first non-blank row, as pandas reads it), each named
    once, with at least one row of data after it and no row longer than it: what pandas would make of anything
    else (`Unnamed: 1`, `a.1`, no rows at all, the first data row's extra cell taken as the index so every cell
    shifts one column) is refused instead. One streaming pass (about 0.3 s for 200k rows, 44 MB); without
    `check_rows`, only up to the first row of data (rows already checked)."""
    try:
        with open(path, newline="", encoding="utf-8-sig") as file, _no_csv_field_size_limit():
            rows = csv.reader(file)
            header = next((row for row in rows if row), None)
            if header is not None:
                _check_header(header, path, argument)
                has_data = (_check_row_lengths(rows, len(header), path, argument) if check_rows
                            else any(row for row in rows))
    except UnicodeDecodeError as error:
        raise DataError(f"`{argument}` {path!r} is not UTF-8 text ({error_reason(error)}); save it as UTF-8 (in Excel: "
                        "'CSV UTF-8').") from error
    except csv.Error as error:  # a guard: the default dialect with no field size limit refuses little
        raise DataError(f"`{argument}` {path!r} could not be read as csv ({error_reason(error)}); fix the "
                        "file.") from error
    if header is None:
        raise DataError(f"`{argument}` {path!r} has no header row; a .csv file starts with a row naming its "
                        "columns, e.g. `text` or `prompt,completion`.")
    if not has_data:
        raise DataError(f"`{argument}` {path!r} has a header row but no rows of data; add data.")
    return header


def _check_header(header: list[str], path: str, argument: str) -> None:
    if empty := [position for position, name in enumerate(header, 1) if not name.strip()]:
        raise DataError(f"`{argument}` {path!r}: the header row has an empty column name (column {empty[0]}); "
                        "name every column, or remove the trailing comma.")
    if repeated := sorted({name for name in header if header.count(name) > 1}):
        raise DataError(f"`{argument}` {path!r}: the header row names the column {repeated[0]!r} twice; give "
                        "each column its own name.")


def _check_row_lengths(rows: _csv.Reader, width: int, path: str, argument: str) -> bool:
    """Whether any row follows the header, refusing the first row with more than ``width`` cells by its line as
    an editor numbers it (pandas' own error, for a later row only, skips blank lines)."""
    has_data = False
    first_line = rows.line_num + 1
    for row in rows:
        if len(row) > width:
            raise DataError(
                f"`{argument}` {path!r}: line {first_line} has {len(row)} fields but the header row has {width}; "
                'put a cell that contains a comma in double quotes ("hello, world"), with no space between the '
                'comma before it and its opening quote, or remove the extra comma.'
            )
        has_data = has_data or bool(row)
        first_line = rows.line_num + 1
    return has_data


@contextlib.contextmanager
def _no_csv_field_size_limit() -> Iterator[None]:
    """Lift the csv module's 131072-character cell limit (process-wide, so restored): pandas has none."""
    previous = csv.field_size_limit(2**31 - 1)
    try:
        yield
    finally:
        csv.field_size_limit(previous)
