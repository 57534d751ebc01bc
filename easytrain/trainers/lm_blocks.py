"""The default hooks' training data: text (or pre-tokenized rows) as `max_length + 1`-token blocks.

Every check runs while the data is prepared, before any model is built: blocks of the wrong length, too few tokens
for one block (named by split, with its fixes), token ids outside the model's vocabulary, and `labels` or
`attention_mask` columns of pre-tokenized rows that mark what easytrain cannot train on (`easytrain.data.pretokenized`).
"""

from __future__ import annotations

from typing import Any

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from easytrain.arguments import TrainingArguments
from easytrain.data import tokenize_and_group
from easytrain.data.errors import DataError, NotEnoughTokensError
from easytrain.data.lm import TOKENS, mismatched_row_lengths
from easytrain.data.pretokenized import ATTENTION_MASK, IGNORE_INDEX, LABELS, MASK_COLUMNS, check_masks
from easytrain.data.row_errors import rows_as_stored, stored_row, stored_rows
from easytrain.data.token_range import check_token_ids
from easytrain.errors import ArgumentError

#: Tokens read at a time to check `labels` and `attention_mask` (8 MB of each int64 column).
_TOKENS_PER_CHECK = 2**20


def lm_eval_blocks(args: TrainingArguments, tokenizer: Any, split: datasets.Dataset, limit: int | None = None,
                   split_name: str | None = None, *, vocab_size: int | None = None) -> datasets.Dataset:
    """One split tokenised and grouped into `max_length + 1`-token blocks, numpy-formatted, every id checked to
    lie below `vocab_size` (None: not checked). `split_name` ('train', 'validation') names it in errors; None is the
    dataset given to `evaluate(dataset)`. A bad pre-tokenized row is named as stored (`row_errors.stored_row`), not
    by its place in a held-out split; text is grouped into new blocks, named by their place."""
    if is_pretokenized(split, args):
        rows_are = f"Pre-tokenized rows of {_described(split_name)}"
        blocks = check_mask_lengths(check_block_length(_truncate(split, limit), args, split_name), rows_are)
        with rows_as_stored(blocks):  # a held-out split's row named as the data given has it
            check_token_ids(blocks, (TOKENS,), vocab_size, rows_are=rows_are, tokenizer=tokenizer)
        return checked_masks(blocks, rows_are).with_format("numpy")
    try:
        grouped = tokenize_and_group(split, tokenizer, text_column=args.text_column, max_length=args.max_length,
                                     num_proc=args.preprocessing_num_workers, max_blocks=limit)
    except NotEnoughTokensError as error:
        raise NotEnoughTokensError(f"{_sentence(_described(split_name))} has {error.num_tokens} tokens after "
                                   f"tokenisation, but one block needs {error.block_size} (max_length + 1); "
                                   f"{_fixes_for_few_tokens(split_name)}", num_tokens=error.num_tokens,
                                   block_size=error.block_size) from None
    blocks = _truncate(grouped, limit)
    check_token_ids(blocks, (TOKENS,), vocab_size, rows_are=f"Token blocks of {_described(split_name)}",
                    tokenizer=tokenizer)
    return blocks.with_format("numpy")


def _described(split_name: str | None) -> str:
    return "the dataset given to evaluate(dataset)" if split_name is None else f"the {split_name!r} split"


def _sentence(text: str) -> str:
    return text[:1].upper() + text[1:]


def _fixes_for_few_tokens(split_name: str | None) -> str:
    if split_name == "validation":
        return ("give more evaluation data (a larger validation_split_percentage, a validation_file or dataset_eval), "
                "lower `max_length`, or set validation_split_percentage=0 when it is held out, to not evaluate.")
    return f"add {'training ' if split_name == 'train' else ''}data or lower `max_length`."


def lm_blocks(args: TrainingArguments, tokenizer: Any, splits: datasets.DatasetDict, *, vocab_size: int | None = None
              ) -> tuple[datasets.Dataset, datasets.Dataset | None]:
    """Tokenise and group each split into `max_length + 1`-token blocks, as numpy-formatted datasets."""
    train = lm_eval_blocks(args, tokenizer, splits["train"], args.max_train_samples, "train", vocab_size=vocab_size)
    eval_split = splits.get("validation")
    return train, (lm_eval_blocks(args, tokenizer, eval_split, args.max_eval_samples, "validation",
                                  vocab_size=vocab_size) if eval_split is not None else None)


def is_pretokenized(split: datasets.Dataset, args: TrainingArguments) -> bool:
    """Rows that are already token blocks (`input_ids`, no text column) are used as they are, their `labels` and
    `attention_mask` (transformers' columns) honoured by the collate (`easytrain.data.pretokenized`)."""
    return "input_ids" in split.column_names and args.text_column not in split.column_names


def check_block_length(split: datasets.Dataset, args: TrainingArguments,
                       split_name: str | None = "train") -> datasets.Dataset:
    """Every pre-tokenized row holds `max_length + 1` tokens, checked on the Arrow offsets before any compute
    (a wrong row otherwise fails mid-training, as a numpy error)."""
    expected, where = args.max_length + 1, _described(split_name)
    if len(split) == 0:
        raise DataError(f"{_sentence(where)} has no rows; pass rows of {expected} token ids.")
    lengths = mismatched_row_lengths(split, expected)
    bad = np.flatnonzero(lengths != expected) if lengths is not None else np.zeros(0, np.int64)
    if not bad.size:
        return split
    if lengths.min() == lengths.max() > 1:
        raise ArgumentError("max_length", f"pre-tokenized rows of {where} hold {lengths[0]} tokens but training "
                                          f"needs blocks of max_length + 1 = {expected}; set --max_length "
                                          f"{lengths[0] - 1}.")
    row = int(bad[0])
    raise DataError(f"Pre-tokenized rows of {where}: row {stored_row(split, row)} holds {lengths[row]} tokens, but "
                    f"every row must hold max_length + 1 = {expected} (row {stored_row(split, 0)} holds "
                    f"{lengths[0]}); fix or drop such rows, e.g. split.filter(lambda row: len(row['input_ids']) == "
                    f"{expected}).")


def check_mask_lengths(split: datasets.Dataset, rows_are: str) -> datasets.Dataset:
    """Every row's `labels` and `attention_mask` hold one value per input id (checked on the Arrow offsets)."""
    expected = len(split[0][TOKENS])  # check_block_length made every row this long
    for column in token_mask_columns(split):
        if (lengths := mismatched_row_lengths(split, expected, column)) is not None:
            row = int(np.flatnonzero(lengths != expected)[0])
            raise DataError(f"{rows_are}: row {stored_row(split, row)}'s {column!r} holds {lengths[row]} values but "
                            f"its {TOKENS!r} hold {expected}; give one value per token, or drop the {column!r} column.")
    return split


def checked_masks(split: datasets.Dataset, rows_are: str) -> datasets.Dataset:
    """`split` once its `labels` and `attention_mask` passed `check_masks` (before any compute, naming the row);
    a column that masks nothing (no -100 label, no padding) is removed, so batches keep the unmasked layout.
    Reads Arrow batches of about `_TOKENS_PER_CHECK` tokens (no copy of stored rows): about 0.2 s per 10M tokens."""
    columns = token_mask_columns(split)
    if not columns:
        return split
    length = len(split[0][TOKENS])  # check_block_length made every row this long
    masking: set[str] = set()
    start, rows_per_batch = 0, max(1, _TOKENS_PER_CHECK // length)
    for table in split.with_format("arrow", columns=[TOKENS, *columns]).iter(batch_size=rows_per_batch):
        rows = {name: _row_matrix(table.column(name), length) for name in table.column_names}
        check_masks(rows[TOKENS], rows.get(LABELS), rows.get(ATTENTION_MASK), rows_are=rows_are,
                    row_names=stored_rows(split, start, start + table.num_rows))
        start += table.num_rows
        masking |= {name for name, marker in ((LABELS, IGNORE_INDEX), (ATTENTION_MASK, 0))
                    if name in rows and (rows[name] == marker).any()}
    return split.remove_columns([name for name in columns if name not in masking])


def token_mask_columns(split: datasets.Dataset) -> list[str]:
    """transformers' per-token `labels` and `attention_mask` of `split`: list columns of those names (a column of
    one value per row, such as a class label, belongs to another layout and is carried along unread)."""
    lists = (pa.types.is_list, pa.types.is_large_list, pa.types.is_fixed_size_list)
    return [name for name in MASK_COLUMNS if name in split.column_names
            and any(is_list(split.data.schema.field(name).type) for is_list in lists)]


def _row_matrix(column: pa.ChunkedArray, length: int) -> np.ndarray:
    """A list column whose rows all hold `length` values, as one `[rows, length]` array."""
    return np.asarray(pc.list_flatten(column).to_numpy(zero_copy_only=False)).reshape(-1, length)


def _truncate(dataset: datasets.Dataset, limit: int | None) -> datasets.Dataset:
    return dataset if limit is None else dataset.select(range(min(limit, len(dataset))))
