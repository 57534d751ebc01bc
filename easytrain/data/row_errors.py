"""Errors in one example, named by its row, so a bad row in a million can be found and fixed.

The per-row tokenisers raise plain ``DataError``s that describe the problem; ``at_row`` adds which row
(its 0-based index in the dataset given, which ``datasets.map(with_indices=True)`` supplies even when
worker processes tokenise shards of it). ``rows_as_stored`` then names that row as the user's data has it:
a held-out validation split, a shuffle or a selection is a mapping onto the stored rows (the file's rows, the
dataset as loaded), and the row a user can look up is the stored one. It maps every ``RowNamingError`` (a
``RowError``, a ``token_range.TokenRangeError``); checks that word their own messages name rows by ``stored_row``. A
caller that knows which split the rows are (train, validation) can say so with ``RowError.within``;
``NoExampleLeftError.within`` likewise names the split that lost every example, and where its rows come from.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any

from easytrain.data.errors import DataError


class RowNamingError(DataError):
    """An error about one row, ``row``, of the rows it was raised over; ``naming_row`` gives the same error about
    another row, so ``rows_as_stored`` can name the stored row of a split's."""

    row: int

    def naming_row(self, row: int) -> RowNamingError:
        raise NotImplementedError(f"{type(self).__name__} must say how it names another row")


class RowError(RowNamingError):
    """A bad example: ``row`` is its 0-based index in ``where`` (in its stored rows after ``rows_as_stored``);
    ``details`` say what is wrong and the fix."""

    def __init__(self, row: int, details: str, where: str = "the dataset given") -> None:
        super().__init__(f"Example {row} (0-based row index) of {where}: {details}")
        self.row, self.details, self.where = row, details, where

    def __reduce__(self) -> tuple[type[RowError], tuple[int, str, str]]:
        # Worker processes of ``datasets.map`` pickle the error back to the parent.
        return type(self), (self.row, self.details, self.where)

    def within(self, where: str) -> RowError:
        """The same error, its row said to be in ``where`` (e.g. "the 'train' split")."""
        return RowError(self.row, self.details, where)

    def naming_row(self, row: int) -> RowError:
        return RowError(row, self.details, self.where)


#: Where each split's rows come from, as ``token_range.rows_of`` names the split: the fields a user checks.
SPLIT_SOURCES = {
    "the 'train' split": "Its rows come from `dataset_train`, `train_file` or `dataset_name`.",
    "the 'validation' split": ("Its rows come from `dataset_eval`, `validation_file`, the validation split of "
                               "`dataset_name`, or the `validation_split_percentage` of training rows held out."),
}


class NoExampleLeftError(DataError):
    """Every example of a dataset was dropped. The data functions are not told which split they tokenise, so the
    caller that knows names it with ``within``; ``opening`` says what is missing (e.g. "No example is left")."""

    def __init__(self, opening: str, details: str, where: str | None = None) -> None:
        located = opening if where is None else f"{opening} in {where}"
        sources = f" {SPLIT_SOURCES[where]}" if where in SPLIT_SOURCES else ""
        super().__init__(f"{located}: {details}{sources}")
        self.opening, self.details, self.where = opening, details, where

    def __reduce__(self) -> tuple[type[NoExampleLeftError], tuple[str, str, str | None]]:
        return type(self), (self.opening, self.details, self.where)

    def within(self, where: str) -> NoExampleLeftError:
        """The same error, said to be about ``where`` (e.g. "the 'validation' split"), with where its rows come from."""
        return NoExampleLeftError(self.opening, self.details, where)


@contextlib.contextmanager
def at_row(row: int) -> Iterator[None]:
    """A ``DataError`` raised inside becomes a ``RowError`` naming ``row`` (the original chained)."""
    try:
        yield
    except RowError:
        raise
    except DataError as error:
        raise RowError(row, str(error)) from error


@contextlib.contextmanager
def rows_as_stored(dataset: Any) -> Iterator[None]:
    """A ``RowNamingError`` raised inside, naming a row of ``dataset``, names that row of the stored data instead.

    ``dataset``'s selection (``datasets.Dataset`` indices mapping: a held-out split, a shuffle, a selection) is
    read on entering, so rows may be re-mapped inside (``formatting_func``, ``map``'s output in the same order) without
    losing it. Without one, a row of ``dataset`` is its stored row and the error goes on unchanged. Read only when an
    error is raised.
    """
    indices = getattr(dataset, "_indices", None)
    try:
        yield
    except RowNamingError as error:
        stored = _through(indices, error.row)
        if stored == error.row:
            raise
        raise error.naming_row(stored) from error.__cause__


def stored_row(dataset: Any, row: int) -> int:
    """The stored row behind ``dataset``'s ``row``: through its selection (a held-out split, a shuffle), if any."""
    return _through(getattr(dataset, "_indices", None), row)


def _through(indices: Any, row: int) -> int:
    """``row`` mapped through a selection's indices table (None, or a row outside it: ``row`` itself)."""
    if indices is None or not 0 <= row < indices.num_rows:
        return row
    return int(indices.column(0)[row].as_py())


def stored_rows(dataset: Any, start: int, stop: int) -> Sequence[int]:
    """``stored_row`` of each of ``dataset``'s rows ``start`` to ``stop`` (one Arrow slice, no loop)."""
    indices = getattr(dataset, "_indices", None)
    if indices is None:
        return range(start, stop)
    return indices.column(0).slice(start, stop - start).to_pylist()
