"""Causal language-modelling data: documents -> fixed-size token blocks -> batches.

Documents are tokenised, joined with an EOS after each one (so the model learns
where documents end), and cut into equal blocks of ``max_length + 1`` tokens.
One extra token per block lets every position have a next-token target without
padding, so every batch has the same static shape.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping, Sequence
from typing import Any, TypeAlias

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from transformers import PreTrainedTokenizerBase

from easytrain.data.errors import DataError, NotEnoughTokensError
from easytrain.data.pretokenized import ATTENTION_MASK, LABELS, MASK_COLUMNS, honour_masks

#: One batch: static-shape host arrays keyed by name (see ``lm_collate``).
Batch: TypeAlias = dict[str, np.ndarray]

#: The column holding token ids, both after tokenisation and after grouping.
TOKENS = "input_ids"
_NUM_TOKENS = "num_tokens"

# Grouping ``map`` batches are sized to hold about this many blocks on average: it bounds
# the memory of one batch only, since each batch's leftover tokens carry into the next.
_BLOCKS_PER_GROUP_BATCH = 64

# Under a block limit, documents are tokenised in parts from the first on: this many at least per part,
# the next part sized from the tokens per document seen so far.
_PART_DOCUMENTS = 1024

# The tokenised columns, as `datasets` infers them from a batch with tokens (an `input_ids` column as int32).
_TOKENIZED = datasets.Features({TOKENS: datasets.List(datasets.Value("int32")), _NUM_TOKENS: datasets.Value("int64")})


def tokenize_and_group(
    dataset: datasets.Dataset,
    tokenizer: PreTrainedTokenizerBase,
    *,
    text_column: str = "text",
    max_length: int,
    num_proc: int | None = None,
    append_eos: bool = True,
    max_blocks: int | None = None,
) -> datasets.Dataset:
    """Tokenise documents and pack the tokens into blocks of ``max_length + 1``.

    Both steps are cached ``datasets.map`` calls, so a rerun over the same
    file-backed data with the same tokenizer reuses the Arrow files.

    Args:
        dataset: One split whose ``text_column`` holds a document per row.
        tokenizer: Tokenizer used without its own special tokens; the EOS
            appended here is the only document separator.
        text_column: Name of the column with the documents.
        max_length: Sequence length the model sees; blocks hold one more token.
        num_proc: Worker processes for tokenising (``None`` runs in-process).
        append_eos: Add ``tokenizer.eos_token_id`` after every document.
        max_blocks: Only these first blocks are wanted (``max_train_samples``):
            documents are tokenised from the first on until they fill them, so
            a short run on a large corpus does not tokenise all of it. The
            blocks are the unlimited call's first ones; a few more may follow.

    Returns:
        A dataset with only an ``"input_ids"`` column of equal-length blocks;
        the trainer feeds ``block[:-1]`` and predicts ``block[1:]``.

    Raises:
        DataError: Missing text column, no EOS token while ``append_eos``,
            a non-positive ``max_length``, or too few tokens for one block.
    """
    _check_text_column(dataset, text_column)
    if max_length < 1:
        raise DataError(f"`max_length` must be at least 1, got {max_length}.")
    eos_id = _eos_id(tokenizer) if append_eos else None
    if max_blocks is None:
        tokenized = _tokenize_documents(dataset, tokenizer, text_column, eos_id, num_proc)
    else:
        tokenized = _tokenize_prefix(dataset, tokenizer, text_column, eos_id, num_proc, max_blocks * (max_length + 1))
    return _group_blocks(tokenized, max_length + 1)


def lm_collate(blocks_NL: np.ndarray, example_ids: np.ndarray) -> Batch:
    """Shift token blocks into the trainer's batch format.

    Args:
        blocks_NL: ``[N, T + 1]`` token blocks.
        example_ids: ``[N]`` row index of each block in its dataset.

    Returns:
        ``input_ids``/``targets`` int32 ``[N, T]`` (targets already shifted),
        ``loss_mask`` float32 (ones; zeros on padding rows, whose example id
        is negative) and ``example_id`` int32 ``[N]``. No ``attention_mask``:
        a block has no padding, and an all-ones mask would make the model
        attend through its padding path (a key mask; on cuDNN a conditional
        per layer) for nothing.
    """
    if isinstance(blocks_NL, Mapping):
        raise DataError(
            "`lm_collate` takes the [N, T + 1] block array, not a mapping of columns; "
            "give the loaders `collate=lm_collate_rows` instead."
        )
    blocks_NL = np.asarray(blocks_NL, dtype=np.int32)
    if blocks_NL.ndim != 2 or blocks_NL.shape[1] < 2:
        raise DataError(
            f"`lm_collate` needs [N, T + 1] blocks with T >= 1, got shape {blocks_NL.shape}."
        )
    inputs_NT = blocks_NL[:, :-1]
    example_ids = np.asarray(example_ids, dtype=np.int32)
    real_N1 = (example_ids >= 0)[:, None]
    return {
        "input_ids": inputs_NT,
        "targets": blocks_NL[:, 1:],
        "loss_mask": np.broadcast_to(real_N1, inputs_NT.shape).astype(np.float32),
        "example_id": example_ids,
    }


def lm_collate_rows(rows: Mapping[str, np.ndarray], example_ids: np.ndarray) -> Batch:
    """``lm_collate`` for rows read from a source: uses its ``"input_ids"`` column, and honours transformers'
    ``labels`` and ``attention_mask`` columns when the rows have them (``easytrain.data.pretokenized``):
    a target whose label is -100 or that is padding gets ``loss_mask`` 0, and rows with an ``attention_mask``
    get one in the batch (1 real, 0 the padding moved to their end). Other columns are not read.

    This is the loaders' default collate, since loaders hand over whole rows.
    """
    if TOKENS not in rows:
        raise DataError(
            f"Rows have no {TOKENS!r} column (they have {', '.join(rows)}); "
            "run `tokenize_and_group` first or pass a `collate` for these columns."
        )
    masks = {column: rows[column] for column in MASK_COLUMNS if column in rows and np.ndim(rows[column]) == 2}
    if not masks:  # none, or another layout's columns of those names (a class label per row): not read
        return lm_collate(rows[TOKENS], example_ids)
    honoured = honour_masks(rows[TOKENS], masks.get(LABELS), masks.get(ATTENTION_MASK),
                            row_names=np.asarray(example_ids).tolist(), rows_are="Rows")
    batch = lm_collate(honoured.tokens_NL, example_ids)
    batch["loss_mask"] = batch["loss_mask"] * honoured.supervised_NL[:, 1:]
    if ATTENTION_MASK in masks:
        batch["attention_mask"] = honoured.real_NL[:, :-1].astype(np.int32)
    return batch


def mismatched_row_lengths(dataset: datasets.Dataset, length: int, column: str = TOKENS) -> np.ndarray | None:
    """None when every row of ``column`` holds ``length`` tokens, else every row's token count in row order.

    Reads the Arrow list offsets, so no token is copied; only when a selection (``select``, ``shuffle``,
    a held-out split) sits over stored rows of other lengths are the selected rows read, to index them.
    """
    stored = _list_lengths(dataset.data.column(column), column)
    if (stored == length).all():
        return None
    if getattr(dataset, "_indices", None) is None:  # the rows are the stored rows, in order
        return stored
    batches = dataset.with_format("arrow").iter(batch_size=4096)
    return np.concatenate([np.zeros(0, np.int64), *(_list_lengths(batch[column], column) for batch in batches)])


def _list_lengths(values: Any, column: str) -> np.ndarray:
    if not any(check(values.type) for check in (pa.types.is_list, pa.types.is_large_list, pa.types.is_fixed_size_list)):
        raise DataError(f"Column {column!r} holds {values.type} values, not one list per row.")
    return np.asarray(pc.list_value_length(values).fill_null(0).to_numpy(), dtype=np.int64)


def _check_text_column(dataset: datasets.Dataset, text_column: str) -> None:
    if text_column not in dataset.column_names:
        raise DataError(
            f"Text column {text_column!r} is not in the dataset (columns: "
            f"{', '.join(dataset.column_names) or 'none'}); set `text_column` to one of them."
        )
    feature = dataset.features.get(text_column)
    if isinstance(feature, datasets.Value) and feature.dtype in ("string", "large_string"):
        return
    if isinstance(feature, datasets.Value):
        raise DataError(
            f"Text column {text_column!r} holds {feature.dtype} values, not text; set `text_column` to a "
            "column of strings, or convert this one (e.g. dataset.cast_column(name, datasets.Value('string')))."
        )
    raise DataError(
        f"Text column {text_column!r} holds {_feature_kind(feature)} ({feature!r}), not strings; turn each row "
        "into one string first (a formatting step, e.g. dataset.map(lambda row: {'text': ...})), or set "
        "`text_column` to a column of strings."
    )


def _feature_kind(feature: Any) -> str:
    """What a non-string column holds, in words: the tokenizer fails on it with an unhelpful error."""
    if isinstance(feature, dict):
        return "dicts"
    if isinstance(feature, (datasets.Sequence, datasets.LargeList, list)):
        return "lists"
    return f"{type(feature).__name__} values"


def _eos_id(tokenizer: PreTrainedTokenizerBase) -> int:
    if tokenizer.eos_token_id is None:
        raise DataError(
            "The tokenizer has no EOS token, which `append_eos=True` needs to mark "
            "document ends; give the tokenizer an `eos_token` or pass `append_eos=False`."
        )
    return int(tokenizer.eos_token_id)


def _tokenize_documents(
    dataset: datasets.Dataset,
    tokenizer: PreTrainedTokenizerBase,
    text_column: str,
    eos_id: int | None,
    num_proc: int | None,
) -> datasets.Dataset:
    """One cached ``map``; keeps per-document token counts for sizing the grouping."""
    return dataset.map(
        _tokenize,
        batched=True,
        num_proc=num_proc,
        remove_columns=dataset.column_names,
        load_from_cache_file=True,
        fn_kwargs={"tokenizer": tokenizer, "text_column": text_column, "eos_id": eos_id},
        features=_TOKENIZED,  # not inferred from the first batch: one of empty documents types its rows as null
        desc="Tokenizing",
    )


def _tokenize_prefix(
    dataset: datasets.Dataset,
    tokenizer: PreTrainedTokenizerBase,
    text_column: str,
    eos_id: int | None,
    num_proc: int | None,
    tokens_wanted: int,
) -> datasets.Dataset:
    """The first documents, tokenised, until they hold ``tokens_wanted`` tokens (or every document): the blocks
    cut from this prefix's stream are the whole stream's first ones, since grouping only cuts the stream."""
    parts: list[datasets.Dataset] = []
    tokens = start = 0
    size = _PART_DOCUMENTS
    while not parts or (start < len(dataset) and tokens < tokens_wanted):  # an empty split: one empty part
        stop = min(len(dataset), start + size)
        part = dataset if (start, stop) == (0, len(dataset)) else dataset.select(range(start, stop))
        parts.append(_tokenize_documents(part, tokenizer, text_column, eos_id, num_proc))
        tokens, start = tokens + _token_count(parts[-1]), stop
        # aim to finish with the next part: 5% over the documents the tokens per document so far say are left
        left = math.ceil((tokens_wanted - tokens) * start / tokens * 1.05) if tokens else 2 * size
        size = max(_PART_DOCUMENTS, left)
    return parts[0] if len(parts) == 1 else datasets.concatenate_datasets(parts)


def _token_count(tokenized: datasets.Dataset) -> int:
    """Tokens in all rows, summed by Arrow (numpy over a `datasets` column reads it row by row)."""
    if _NUM_TOKENS not in tokenized.column_names:  # `map` over no rows gives no columns
        return 0
    return int(pc.sum(tokenized.with_format("arrow")[_NUM_TOKENS]).as_py() or 0)


def _group_blocks(tokenized: datasets.Dataset, block_size: int) -> datasets.Dataset:
    """Pack token rows into blocks, failing early when not even one block fits.

    Runs in one process, each batch's leftover tokens carried into the next: only the stream's
    last partial block is lost, and the blocks depend on neither ``num_proc`` nor batch sizes.
    """
    num_tokens = _token_count(tokenized)
    if num_tokens < block_size:
        raise NotEnoughTokensError(
            f"The dataset has {num_tokens} tokens after tokenisation, but one block needs "
            f"{block_size} (max_length + 1); add data or lower `max_length`.",
            num_tokens=num_tokens,
            block_size=block_size,
        )
    return tokenized.map(
        _group,
        batched=True,
        with_indices=True,
        batch_size=_group_batch_size(len(tokenized), num_tokens, block_size),
        remove_columns=tokenized.column_names,
        load_from_cache_file=True,
        fn_kwargs={"block_size": block_size, "carry": _Carry()},
        desc=f"Grouping into blocks of {block_size}",
    )


def _tokenize(
    batch: Mapping[str, Sequence[Any]],
    *,
    tokenizer: PreTrainedTokenizerBase,
    text_column: str,
    eos_id: int | None,
) -> dict[str, list[Any]]:
    """Tokenise without the tokenizer's own special tokens, then add EOS.

    Empty documents become empty rows rather than lone EOS tokens.
    """
    texts = [text or "" for text in batch[text_column]]
    ids = tokenizer(texts, add_special_tokens=False)[TOKENS]
    suffix = [] if eos_id is None else [eos_id]
    rows = [row + suffix if text else [] for row, text in zip(ids, texts, strict=True)]
    return {TOKENS: rows, _NUM_TOKENS: [len(row) for row in rows]}


def _group_batch_size(num_docs: int, num_tokens: int, block_size: int) -> int:
    """Documents per grouping batch so an average batch fills many blocks."""
    docs_per_block = num_docs * block_size / num_tokens
    return max(1, min(num_docs, math.ceil(_BLOCKS_PER_GROUP_BATCH * docs_per_block)))


class _Carry:
    """Tokens a grouping batch could not fill a block with, for the next batch (in row order)."""

    def __init__(self) -> None:
        self.tokens = np.zeros(0, dtype=np.int32)
        self.next_row = 0


def _group(
    batch: Mapping[str, Sequence[Sequence[int]]], indices: Sequence[int], *, block_size: int, carry: _Carry
) -> dict[str, np.ndarray]:
    """Cut the carried tokens plus this batch's rows into whole blocks; carry the rest on."""
    first = indices[0] if len(indices) else carry.next_row
    if first == 0:  # a (re)run from the start
        carry.tokens, carry.next_row = carry.tokens[:0], 0
    if first != carry.next_row:
        raise RuntimeError(f"grouping got rows from {first} on after rows up to {carry.next_row}: out of order")
    batch_tokens = np.fromiter(itertools.chain.from_iterable(batch[TOKENS]), dtype=np.int32)
    tokens = np.concatenate([carry.tokens, batch_tokens])
    num_blocks = len(tokens) // block_size
    carry.tokens, carry.next_row = tokens[num_blocks * block_size :].copy(), first + len(indices)
    return {TOKENS: tokens[: num_blocks * block_size].reshape(num_blocks, block_size)}
