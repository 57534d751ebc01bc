"""Checks on what a `collate` returns, made on the host for every batch before it reaches the device.

A collate of a trainer's own (docs/custom_trainer.md) builds batches the rows' checks
(`easytrain.data.token_range.check_token_ids`) never saw: a row dropped or added would train silently on one
device, and a token id outside the vocabulary (-100 as an ignore marker, an id past the table) would be wrapped or
clamped by the compiled embedding gather, silently. Both are refused here, naming the field and the fix. The token
check is one ``max`` per token-id field, read as unsigned so that a negative id reads as a huge one (about 3 us
for a ``[8, 256]`` int32 field); only a batch that fails it is searched, to name the first bad id.
"""

from __future__ import annotations

import numbers
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from easytrain.data.errors import DataError
from easytrain.data.lm import Batch
from easytrain.data.token_range import TokenRangeError, fix_for

#: The token-id fields of the trainers' own batch layouts (language-model blocks, SFT examples and preference
#: pairs all name them so); a trainer whose collate names its ids otherwise passes its own.
TOKEN_FIELDS: tuple[str, ...] = ("input_ids", "targets")

_UNSIGNED = {np.dtype(signed): np.dtype(unsigned) for signed, unsigned in (
    (np.int8, np.uint8), (np.int16, np.uint16), (np.int32, np.uint32), (np.int64, np.uint64))}


class BatchCheck:
    """Applied to every collated batch: one row per example, and token ids inside ``[0, vocab_size)``."""

    def __init__(self, vocab_size: int | None = None, token_fields: Sequence[str] = TOKEN_FIELDS) -> None:
        """``vocab_size``: the model's vocabulary size; None checks no token id (a module without a config)."""
        if vocab_size is not None and (isinstance(vocab_size, bool) or not isinstance(vocab_size, numbers.Integral)
                                       or vocab_size < 1):
            raise DataError(f"`vocab_size` must be the model's vocabulary size (a positive integer) or None to "
                            f"check no token id, got {vocab_size!r}.")
        self.vocab_size = None if vocab_size is None else int(vocab_size)
        self.token_fields = tuple(token_fields)
        # The default names describe the trainers' own layouts, where a field may be absent (a classifier has no
        # targets); fields a trainer declares are its token ids, so one absent or not integer is a mistake.
        self.declared = self.token_fields != TOKEN_FIELDS

    def __call__(self, batch: Batch, example_ids: np.ndarray) -> Batch:
        check_is_batch(batch)  # here, on the reader thread: the loader would drop a None batch, ending the data
        one_row_each(batch, len(example_ids))
        if self.vocab_size is not None and isinstance(batch, Mapping):
            for field in self.token_fields:
                if self.declared:
                    check_declared_field(batch, field)
                check_batch_ids(batch.get(field), field, example_ids, self.vocab_size)
        return batch


def check_is_batch(batch: Any) -> None:
    """Refuse what `collate` returned unless it is a dict of fields."""
    if not isinstance(batch, Mapping):
        raise TypeError(f"collate returned a {type(batch).__name__}; return a dict of field name -> numpy array "
                        "(one row per example).")


def check_declared_field(batch: Mapping[str, Any], field: str) -> None:
    """Refuse a declared token field that is absent (a typo would switch its range check off silently) or holds no
    integers (float ids fail deep inside the compiled embedding lookup)."""
    if field not in batch:
        raise DataError(f"token_fields names {field!r}, which is not in the batch `collate` returned (its fields: "
                        f"{', '.join(map(repr, sorted(batch)))}); set the trainer's token_fields to the fields that "
                        "hold token ids, or have collate return that field.")
    dtype = getattr(batch[field], "dtype", None)
    if dtype is None or np.dtype(dtype).kind not in "iu":
        raise DataError(f"token field {field!r} holds {dtype or type(batch[field]).__name__}, not integer token "
                        f"ids; have collate return it as integers (e.g. np.asarray(ids, np.int32)), or drop {field!r} "
                        "from the trainer's token_fields if it holds no token ids.")


def one_row_each(batch: Batch, rows: int) -> Batch:
    """`batch` if each of its arrays holds one row per example collated: a row lost or added would otherwise train
    silently on one device (and misalign the example ids a resume counts on)."""
    for name, value in batch.items() if isinstance(batch, Mapping) else ():
        if isinstance(value, np.ndarray) and value.ndim and len(value) != rows:
            raise DataError(f"collate returned {len(value)} rows in field {name!r} for {rows} examples; every array "
                            "field holds one row per example, in the order given (padding rows included: weigh them "
                            "0 rather than dropping them).")
    return batch


def check_batch_ids(ids: Any, field: str, example_ids: np.ndarray, vocab_size: int) -> None:
    """Refuse an id outside ``[0, vocab_size)`` in ``ids`` (a field of one collated batch, row ``b`` for example
    ``example_ids[b]``); a field that is absent or holds no integers is not token ids."""
    if not isinstance(ids, np.ndarray) or ids.dtype.kind not in "iu" or not ids.size or ids.ndim == 0:
        return
    unsigned = _UNSIGNED.get(ids.dtype)  # one pass: as unsigned, a negative id reads as a huge one
    if ids.view(unsigned).max() < vocab_size if unsigned else ids.min() >= 0 and ids.max() < vocab_size:
        return
    outside = (ids < 0) | (ids >= vocab_size)
    where = np.unravel_index(int(np.argmax(outside)), ids.shape)
    value, count = int(ids[where]), int(outside.sum())
    bad = ids[outside]
    ids_in_all = "1 such id" if count == 1 else f"{count} such ids, from {int(bad.min())} to {int(bad.max())}"
    row, position = int(where[0]), tuple(int(index) for index in where[1:])
    example = int(example_ids[row]) if row < len(example_ids) else -1
    shown = position[0] if len(position) == 1 else position  # [B, T] fields: the token's index in the row
    raise TokenRangeError(
        "A batch from `collate`", f"holds a token id outside the model's vocabulary [0, {vocab_size}): field "
        f"{field!r}, batch row {row} (example id {example}), position {shown} holds token id {value} "
        f"({ids_in_all} in the batch); the embedding would wrap or clamp it silently. {_fix(value)}",
        field=field, row=example, position=int(np.ravel_multi_index(position, ids.shape[1:])) if position else 0,
        token_id=value, vocab_size=vocab_size)


def _fix(token_id: int) -> str:
    if token_id >= 0:
        return fix_for(token_id)
    return ("Negative ids are not tokens (an ignore or padding marker such as -100?): easytrain reads ignored and "
            "padding positions from loss_mask and attention_mask, never from the ids, so have `collate` write real "
            "token ids there (e.g. the pad token's) and weigh them 0 in loss_mask.")
