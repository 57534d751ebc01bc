"""Token ids outside the model's vocabulary, refused when the data is prepared.

Inside the compiled step nothing can refuse them: a negative id wraps around in the embedding gather (the model
trains on another token, silently) and an id past the table embeds as NaN (the step is skipped as non-finite, or
trains on NaN under ``non_finite_policy='ignore'``). The trainers check their own token-id fields once, before any
compute: one ``min_max`` over the flattened Arrow list column (no token copied), and only when that finds an id
outside ``[0, vocab_size)`` a pass over the rows in use to name the first one.

Only fields the trainer's own data layout makes token ids are checked (``input_ids`` of language-model blocks and
SFT examples; ``chosen_input_ids``/``rejected_input_ids`` of preference pairs); targets are those same ids shifted,
and padding or unsupervised positions are marked by ``loss_mask``/``attention_mask``, never by an id such as -100.
"""

from __future__ import annotations

import contextlib
import numbers
from collections.abc import Iterator, Sequence
from typing import Any, NamedTuple

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from easytrain.data.row_errors import NoExampleLeftError, RowError, RowNamingError

# Rows per Arrow batch when a selection (``select``, ``shuffle``, a held-out split) is read to locate a bad id.
_ROWS_PER_BATCH = 8192


class TokenRangeError(RowNamingError):
    """A token id outside ``[0, vocab_size)``; the attributes say where (``row`` counts the rows checked, or is
    the stored row after ``row_errors.rows_as_stored``). ``found`` and ``token_name``, given by
    ``check_token_ids``, let ``naming_row`` word the message again; without them ``details`` is the caller's."""

    def __init__(self, rows_are: str, details: str, *, field: str, row: int, position: int, token_id: int,
                 vocab_size: int, found: _Outside | None = None, token_name: str = "") -> None:
        super().__init__(f"{rows_are} {details}")
        self.rows_are, self.details, self.found, self.token_name = rows_are, details, found, token_name
        self.field, self.row, self.position, self.token_id, self.vocab_size = field, row, position, token_id, vocab_size

    def within(self, where: str) -> TokenRangeError:
        """The same error, its rows said to be those of ``where`` (a split the data function was not told of)."""
        return self._copy(f"{self.rows_are} of {where}", self.details, self.row)

    def naming_row(self, row: int) -> TokenRangeError:
        """The same error about ``row`` (the stored row behind a split's); one worded by its caller names no row."""
        if self.found is None:
            return self
        found = self.found._replace(row=row)
        return self._copy(self.rows_are, _details(self.field, found, self.vocab_size, self.token_name), row, found)

    def _copy(self, rows_are: str, details: str, row: int, found: _Outside | None = None) -> TokenRangeError:
        return TokenRangeError(rows_are, details, field=self.field, row=row, position=self.position,
                               token_id=self.token_id, vocab_size=self.vocab_size, found=found or self.found,
                               token_name=self.token_name)


@contextlib.contextmanager
def rows_of(split_name: str | None) -> Iterator[None]:
    """Token-range, row and no-example-left errors raised inside name the split (None: the dataset given to
    ``evaluate(dataset)``)."""
    try:
        yield
    except (TokenRangeError, RowError, NoExampleLeftError) as error:
        where = "the dataset given to evaluate(dataset)" if split_name is None else f"the {split_name!r} split"
        raise error.within(where) from None


class _Outside(NamedTuple):
    """The first id outside the vocabulary (row and position in it), and how many and which values there are."""

    row: int
    position: int
    value: int
    count: int
    low: int
    high: int


def vocab_size_of(config: Any) -> int | None:
    """The model's vocabulary size from its config; None (nothing is checked) without one."""
    size = getattr(config, "vocab_size", None)
    return int(size) if isinstance(size, numbers.Integral) and size > 0 else None


def filler_id(pad_token_id: int | None, config: Any) -> int:
    """The id padding positions hold: the tokenizer's pad where the model's vocabulary has it, else 0 (also without a
    pad). Padding is masked (``attention_mask``, ``loss_mask`` 0), so its id never reaches the loss; a pad past the
    table (added to the tokenizer after the model was trained) would only have the batch check refuse the filler.
    A real token equal to that pad is still refused with the data (``check_token_ids``)."""
    vocab_size = vocab_size_of(config)
    if pad_token_id is None or pad_token_id < 0 or vocab_size is not None and pad_token_id >= vocab_size:
        return 0
    return int(pad_token_id)


def check_token_ids(rows: datasets.Dataset, fields: Sequence[str], vocab_size: int | None, *, rows_are: str,
                    tokenizer: Any = None) -> None:
    """Refuse an id outside ``[0, vocab_size)`` in any of ``fields`` (list columns) of the rows in use.

    Args:
        rows: The prepared rows; with a selection over stored rows, only the selected ones count.
        fields: The token-id columns of the trainer's layout.
        vocab_size: The model's vocabulary size; None checks nothing (a module without a config).
        rows_are: What the rows are, for the message ("Pre-tokenized rows of the 'train' split").
        tokenizer: The run's tokenizer, to name the token behind an id past the model's vocabulary.

    Raises:
        TokenRangeError: naming the field, the first bad row (its place among the rows checked: a caller whose rows
            are a selection, or are made from one, names the stored row with ``row_errors.rows_as_stored``), the
            position and id, the vocabulary size and the fix.
    """
    if vocab_size is None:
        return
    for field in fields:
        if _stored_ids_inside(rows, field, vocab_size):
            continue
        if (found := _first_outside(rows, field, vocab_size)) is not None:
            name = _token_name(found.value, tokenizer)
            raise TokenRangeError(rows_are, _details(field, found, vocab_size, name), field=field, row=found.row,
                                  position=found.position, token_id=found.value, vocab_size=vocab_size, found=found,
                                  token_name=name)


def _stored_ids_inside(rows: datasets.Dataset, field: str, vocab_size: int) -> bool:
    """Every stored id of ``field`` (a superset of the rows in use) lies in the vocabulary: one vectorised pass."""
    values = _flat(rows.data.column(field))
    if values is None or len(values) == values.null_count:
        return True
    bounds = pc.min_max(values)
    return bounds["min"].as_py() >= 0 and bounds["max"].as_py() < vocab_size


def _flat(column: pa.ChunkedArray | pa.Array) -> pa.ChunkedArray | pa.Array | None:
    """The ids of a list column, flattened; None when the column holds no list of numbers (not token ids)."""
    if not any(check(column.type) for check in (pa.types.is_list, pa.types.is_large_list,
                                                 pa.types.is_fixed_size_list)):
        return None
    values = pc.list_flatten(column)
    return values if pa.types.is_integer(values.type) or pa.types.is_floating(values.type) else None


def _row_chunks(rows: datasets.Dataset, field: str) -> Iterator[tuple[int, pa.Array]]:
    """``(first row, list array)`` over the rows in use, in order: the stored chunks, or a selection's batches."""
    if getattr(rows, "_indices", None) is None:
        chunks: Iterator[pa.Array] = iter(rows.data.column(field).chunks)
    else:
        batches = rows.with_format("arrow", columns=[field]).iter(batch_size=_ROWS_PER_BATCH)
        chunks = (chunk for batch in batches for chunk in batch.column(field).chunks)
    start = 0
    for chunk in chunks:
        yield start, chunk
        start += len(chunk)


def _first_outside(rows: datasets.Dataset, field: str, vocab_size: int) -> _Outside | None:
    """The first id outside the vocabulary among the rows in use, with the count and range of all such ids."""
    first, count, low, high = None, 0, None, None
    for start, chunk in _row_chunks(rows, field):
        values = _flat(chunk)
        if values is None:
            return None
        ids = np.asarray(values.to_numpy(zero_copy_only=False))
        outside = np.flatnonzero((ids < 0) | (ids >= vocab_size))  # a null (NaN) compares False: not a bad id
        if not outside.size:
            continue
        bad = ids[outside]
        count, low, high = count + bad.size, _lower(low, bad.min()), _higher(high, bad.max())
        if first is None:
            lengths = np.asarray(pc.list_value_length(chunk).fill_null(0).to_numpy(), np.int64)
            ends = np.cumsum(lengths)
            row = int(np.searchsorted(ends, outside[0], side="right"))
            first = (start + row, int(outside[0] - (ends[row] - lengths[row])), int(bad[0]))
    return None if first is None else _Outside(*first, count, int(low), int(high))


def _lower(current: Any, value: Any) -> Any:
    return value if current is None else min(current, value)


def _higher(current: Any, value: Any) -> Any:
    return value if current is None else max(current, value)


def _details(field: str, found: _Outside, vocab_size: int, token_name: str) -> str:
    ids = "1 such id" if found.count == 1 else f"{found.count} such ids, from {found.low} to {found.high}"
    return (f"hold token ids outside the model's vocabulary [0, {vocab_size}) (vocab_size {vocab_size}): field "
            f"{field!r}, row {found.row}, position {found.position} holds token id {found.value}"
            f"{token_name} ({ids} in all). {fix_for(found.value)}")


def _token_name(token_id: int, tokenizer: Any) -> str:
    """`` (the tokenizer's '<tok>')`` when the run's tokenizer has that id: what the model has no row for."""
    if tokenizer is None or token_id < 0 or token_id >= len(tokenizer):
        return ""
    return f" (the tokenizer's {tokenizer.convert_ids_to_tokens(token_id)!r})"


def fix_for(token_id: int) -> str:
    """What to do about an id outside the vocabulary: a negative one is a marker, a large one another tokenizer's."""
    if token_id < 0:
        return ("Negative ids are not tokens (a padding or ignore marker such as -100 or -1?): easytrain never reads "
                "padding or ignored positions from the ids (loss_mask and attention_mask mark them), so write real "
                "token ids there (e.g. the pad token's) or drop those rows.")
    return ("The ids come from a tokenizer larger than the model's vocabulary (tokens added to it, or another "
            "model's tokenizer): tokenize with the model's own tokenizer, or give the model a row for every token "
            "first (in transformers: model.resize_token_embeddings(len(tokenizer)), then save_pretrained and pass "
            "that directory as model_name_or_path).")
