"""Fixed-shape rows for the model: many examples packed per row, or one padded per row.

Batch layout, every array ``[B, T]`` (``example_id`` ``[B]``): ``input_ids``, ``targets`` (the
next token of the same example), ``loss_mask`` (1 where the target is a supervised token),
``segment_ids`` (1, 2, ... per example in the row, 0 for padding), ``positions`` (restarting
at 0 for every example) and ``attention_mask`` (1 real, 0 padding). An example of n tokens
gives n - 1 (input, target) pairs: ``ids[:-1]``, ``ids[1:]``, ``loss_mask = token_mask[1:]``.
With segment ids and restarted positions a packed row computes exactly what the examples
would alone: tokens attend only within their own example.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Literal, NamedTuple

import datasets
import numpy as np
import pyarrow.compute as pc

from easytrain.data.errors import DataError
from easytrain.data.lm import Batch
from easytrain.data.row_errors import NoExampleLeftError

PackingStrategy = Literal["bfd", "wrapped"]
Overflow = Literal["right", "left", "split", "drop"]

#: Columns of ``Packed.rows``; ``packed_collate`` derives ``positions`` and ``attention_mask``.
PACKED_COLUMNS = ("input_ids", "targets", "loss_mask", "segment_ids")
#: Keys of every batch made here.
BATCH_KEYS = ("input_ids", "targets", "loss_mask", "segment_ids", "positions", "attention_mask",
              "example_id")


class Packed(NamedTuple):
    """Packed rows, where each piece of each example went, and packing statistics.

    ``rows`` maps ``PACKED_COLUMNS`` to ``[R, T]`` arrays and is a loader ``RowSource``
    (use ``collate=packed_collate``). ``pieces`` is ``[P, 5]``: row, segment, example
    index, first token and token count of each piece.
    """

    rows: dict[str, np.ndarray]
    pieces: np.ndarray
    stats: dict[str, float]


def best_fit_decreasing(sizes: Sequence[int] | np.ndarray, capacity: int) -> list[np.ndarray]:
    """Bins of item indices: items longest first, each into the fullest bin it fits.

    Ties between equal sizes keep index order and ties between equally full bins take the
    most recently opened one, so the result is a pure function of ``sizes``. Open bins are
    indexed by remaining room in a segment tree, so each item costs O(log capacity).

    Raises:
        DataError: An item is larger than ``capacity`` or not positive.
    """
    sizes = np.asarray(sizes, dtype=np.int64)
    if sizes.size and (sizes.max() > capacity or sizes.min() < 1):
        raise DataError(
            f"Bin packing needs item sizes in [1, {capacity}], got [{sizes.min()}, {sizes.max()}]; "
            "truncate or split long examples first."
        )
    order = np.lexsort((np.arange(sizes.size), -sizes))
    rooms = _RoomIndex(capacity)
    bins: list[list[int]] = []
    for item in order.tolist():
        size = int(sizes[item])
        room = rooms.pop_tightest(size)
        if room is None:
            bins.append([])
            room = (capacity, len(bins) - 1)
        bins[room[1]].append(item)
        if room[0] > size:
            rooms.add(room[0] - size, room[1])
    return [np.asarray(members, dtype=np.int64) for members in bins]


def pack_examples(
    examples: datasets.Dataset | Mapping[str, Sequence[Sequence[int]]],
    seq_length: int,
    *,
    strategy: PackingStrategy = "bfd",
    seed: int = 0,
    overflow: Overflow = "right",
) -> Packed:
    """Pack tokenised examples into rows of ``seq_length`` (input, target) pairs.

    Args:
        examples: ``input_ids`` and ``loss_mask`` per example, e.g. from
            ``tokenize_sft_dataset``. An example fits a row when it has at most
            ``seq_length + 1`` tokens.
        seq_length: Positions per row, ``T``.
        strategy: ``"bfd"`` places whole examples by best-fit decreasing (rows in an order
            shuffled by ``seed``); ``"wrapped"`` concatenates the examples (in an order
            shuffled by ``seed``) and cuts the stream into rows, so examples crossing a row
            boundary are split into separate segments.
        seed: Fixes every random choice, so packing is a pure function of data and seed.
        overflow: For ``"bfd"``, what happens to longer examples: ``"right"`` keeps the
            start, ``"left"`` the end, ``"split"`` cuts them into pieces of their own,
            ``"drop"`` drops them.

    Returns:
        ``Packed`` rows, pieces and stats: ``num_examples``, ``num_rows``, ``num_pieces``,
        ``num_tokens`` (real positions), ``num_supervised_tokens``, ``fill_rate``,
        ``truncated``, ``split``, ``dropped_too_long``, ``dropped_no_supervised_tokens``.

    Raises:
        NoExampleLeftError: Every example was dropped; ``within`` names the split.
    """
    if seq_length < 1:
        raise DataError(f"`seq_length` must be at least 1, got {seq_length}.")
    values, mask, starts = _flat_examples(examples)
    lengths = np.diff(starts)
    if strategy == "bfd":
        pieces, stats = _cut_for_bfd(lengths, seq_length, overflow)
    elif strategy == "wrapped":  # whole examples; the row boundaries cut them later
        pieces = np.stack([np.arange(len(lengths)), np.zeros_like(lengths), lengths], 1)
        stats = {"truncated": 0, "split": 0, "dropped_too_long": 0}
    else:
        raise DataError(f"`strategy` must be 'bfd' or 'wrapped', got {strategy!r}.")
    supervised = np.concatenate([[0], mask.astype(np.int64).cumsum()])  # casting inside cumsum is ~8x slower
    keep = _supervised_pairs(supervised, starts, pieces) > 0
    stats["dropped_no_supervised_tokens"] = int((~keep).sum())
    place = _place_bfd if strategy == "bfd" else _place_wrapped
    placed = place(pieces[keep], seq_length, seed)
    if len(placed) == 0:
        raise NoExampleLeftError("Nothing to pack", f"all {len(lengths)} examples were dropped ({stats}); check that "
                                 "examples have supervised tokens and that `seq_length`/`overflow` fit them.")
    rows = _fill(values, mask, starts, placed, seq_length)
    return Packed(rows, placed[:, :5], _pack_stats(rows, placed, len(lengths), stats))


def packed_collate(rows: Mapping[str, np.ndarray], example_ids: np.ndarray) -> Batch:
    """A batch from ``Packed.rows``: positions restart per segment; ``example_id < 0`` rows are masked."""
    segments_BT = np.asarray(rows["segment_ids"], dtype=np.int32)
    index_T = np.arange(segments_BT.shape[1])
    starts_BT = np.ones(segments_BT.shape, bool)
    starts_BT[:, 1:] = segments_BT[:, 1:] != segments_BT[:, :-1]
    first_BT = np.maximum.accumulate(np.where(starts_BT, index_T, 0), axis=1)
    real_BT = segments_BT > 0
    return _batch(rows["input_ids"], rows["targets"], rows["loss_mask"], segments_BT,
                  np.where(real_BT, index_T - first_BT, 0), real_BT, example_ids)


def bucket_lengths(max_length: int, smallest: int = 16) -> tuple[int, ...]:
    """Powers of two from ``smallest`` below ``max_length``, then ``max_length``.

    Few shapes (compilations) with at most half of each row padding.
    """
    if max_length < 1:
        raise DataError(f"`max_length` must be at least 1, got {max_length}.")
    powers = []
    length = smallest
    while length < max_length:
        powers.append(length)
        length *= 2
    return (*powers, max_length)


class PaddedCollate:
    """One example per row, right-padded to the smallest bucket that fits the batch's longest.

    Each bucket is one batch shape, so one compilation: at most ``len(buckets)``. Loader
    rows arrive as column arrays; ragged ``input_ids``/``loss_mask`` come as object arrays
    of int arrays (or 2-D when the rows happen to share a length). Rows with
    ``example_id < 0`` (the eval loader's padding) get an all-zero ``loss_mask``.
    """

    def __init__(self, buckets: Sequence[int], pad_id: int = 0) -> None:
        """Args: buckets: allowed row lengths T (positions, i.e. tokens - 1); pad_id: filler id."""
        if not buckets or min(buckets) < 1:
            raise DataError(f"`buckets` must be non-empty positive lengths, got {list(buckets)}.")
        self.buckets = tuple(sorted({int(b) for b in buckets}))
        self.pad_id = int(pad_id)

    def __call__(self, rows: Mapping[str, np.ndarray], example_ids: np.ndarray) -> Batch:
        ids = [np.asarray(row, np.int64) for row in rows["input_ids"]]
        masks = [np.asarray(row, np.int64) for row in rows["loss_mask"]]
        longest = max(len(row) for row in ids) - 1
        length = next((b for b in self.buckets if b >= longest), None)
        if length is None:
            raise DataError(
                f"A row has {longest + 1} tokens, more than the largest bucket holds "
                f"({self.buckets[-1]} positions = {self.buckets[-1] + 1} tokens); tokenise with "
                "a smaller `max_length` or add a larger bucket."
            )
        inputs_BT = np.full((len(ids), length), self.pad_id, np.int64)
        targets_BT, mask_BT, real_BT = (np.zeros((len(ids), length), np.int64) for _ in range(3))
        for b, (row, row_mask) in enumerate(zip(ids, masks, strict=True)):
            pairs = max(len(row) - 1, 0)
            inputs_BT[b, :pairs], targets_BT[b, :pairs] = row[:-1], row[1:]
            mask_BT[b, :pairs], real_BT[b, :pairs] = row_mask[1:], 1
        positions_BT = np.where(real_BT > 0, np.arange(length), 0)
        return _batch(inputs_BT, targets_BT, mask_BT, real_BT, positions_BT, real_BT, example_ids)


class _RoomIndex:
    """Open bins by remaining room; a count tree over rooms finds the tightest fit fast."""

    def __init__(self, capacity: int) -> None:
        self._leaves = 1 << capacity.bit_length()  # leaf r holds rooms of size r, r <= capacity
        self._counts = [0] * (2 * self._leaves)
        self._bins: list[list[int]] = [[] for _ in range(capacity + 1)]

    def add(self, room: int, bin_index: int) -> None:
        self._bins[room].append(bin_index)
        self._update(room, 1)

    def pop_tightest(self, size: int) -> tuple[int, int] | None:
        """Remove and return ``(room, bin)`` with the smallest room >= ``size``, if any."""
        node = size + self._leaves
        counts = self._counts
        while not counts[node]:
            while node & 1:  # a right child: climb until there is a right sibling
                node >>= 1
            if node == 0:
                return None
            node += 1
        while node < self._leaves:  # descend to the leftmost non-empty leaf
            node = 2 * node if counts[2 * node] else 2 * node + 1
        room = node - self._leaves
        self._update(room, -1)
        return room, self._bins[room].pop()

    def _update(self, room: int, delta: int) -> None:
        node = room + self._leaves
        while node:
            self._counts[node] += delta
            node >>= 1


def _flat_examples(examples: datasets.Dataset | Mapping[str, Sequence[Sequence[int]]]
                   ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """All tokens and mask bits end to end, and each example's start offset (plus the end)."""
    for column in ("input_ids", "loss_mask"):
        names = examples.column_names if isinstance(examples, datasets.Dataset) else list(examples)
        if column not in names:
            raise DataError(
                f"Packing needs an {column!r} column, but the examples have {list(names)}; "
                "tokenise them with `tokenize_sft_dataset` first."
            )
    if isinstance(examples, datasets.Dataset):
        table = examples.with_format("arrow")[:]
        lengths = pc.list_value_length(table.column("input_ids")).to_numpy()
        values = pc.list_flatten(table.column("input_ids")).to_numpy()
        mask = pc.list_flatten(table.column("loss_mask")).to_numpy()
    else:
        lengths = np.array([len(row) for row in examples["input_ids"]], np.int64)
        values = np.concatenate([np.asarray(r, np.int64) for r in examples["input_ids"]] or [[]])
        mask = np.concatenate([np.asarray(r, np.int64) for r in examples["loss_mask"]] or [[]])
    if len(values) != len(mask):
        raise DataError("`input_ids` and `loss_mask` differ in length in some example; re-tokenise.")
    starts = np.concatenate([[0], lengths.astype(np.int64).cumsum()])
    return values.astype(np.int32), mask.astype(np.int8), starts


def _cut_for_bfd(lengths: np.ndarray, seq_length: int, overflow: Overflow
                 ) -> tuple[np.ndarray, dict[str, int]]:
    """Pieces ``[P, 3]`` (example, first token, token count) that each fit one row."""
    if overflow not in ("right", "left", "split", "drop"):
        raise DataError(f"`overflow` must be 'right', 'left', 'split' or 'drop', got {overflow!r}.")
    pairs = np.maximum(lengths - 1, 0)
    too_long = pairs > seq_length
    stats = {"truncated": 0, "split": 0, "dropped_too_long": 0}
    if overflow == "split":
        counts = np.maximum(1, -(-pairs // seq_length))
        example = np.repeat(np.arange(len(lengths)), counts)
        index = np.arange(counts.sum()) - np.repeat(np.cumsum(counts) - counts, counts)
        first = index * seq_length
        stats["split"] = int(too_long.sum())
        return np.stack([example, first, np.minimum(seq_length, pairs[example] - first) + 1], 1), stats
    example = np.arange(len(lengths))
    if overflow == "drop":
        stats["dropped_too_long"] = int(too_long.sum())
        example = example[~too_long]
    else:
        stats["truncated"] = int(too_long.sum())
    count = np.minimum(lengths[example], seq_length + 1)
    first = lengths[example] - count if overflow == "left" else np.zeros_like(count)
    return np.stack([example, first, count], 1), stats


def _supervised_pairs(supervised: np.ndarray, starts: np.ndarray, pieces: np.ndarray) -> np.ndarray:
    """Supervised targets per piece: mask bits of its tokens 1.., read off a cumulative sum."""
    begin = starts[pieces[:, 0]] + pieces[:, 1]
    return np.where(pieces[:, 2] >= 2, supervised[begin + pieces[:, 2]] - supervised[begin + 1], 0)


def _place_bfd(pieces: np.ndarray, seq_length: int, seed: int) -> np.ndarray:
    """Rows ``[P, 6]``: row, segment, example, first token, token count, column."""
    bins = best_fit_decreasing(pieces[:, 2] - 1, seq_length)
    order = [bins[b] for b in np.random.default_rng(seed).permutation(len(bins))]
    members = np.concatenate(order) if order else np.zeros(0, np.int64)
    sizes = np.array([len(b) for b in order], np.int64)
    row = np.repeat(np.arange(len(order)), sizes)
    return _with_columns(row, pieces[members])


def _place_wrapped(examples: np.ndarray, seq_length: int, seed: int) -> np.ndarray:
    """Concatenate whole examples' pairs in a seeded order and cut the stream every ``seq_length``."""
    examples = examples[np.random.default_rng(seed).permutation(len(examples))]
    pairs = examples[:, 2] - 1
    begin = np.concatenate([[0], np.cumsum(pairs)])  # stream offset of each example
    cuts = np.union1d(begin[:-1], np.arange(0, begin[-1], seq_length))
    ends = np.append(cuts[1:], begin[-1])
    which = np.searchsorted(begin, cuts, side="right") - 1
    pieces = np.stack([examples[which, 0], cuts - begin[which], ends - cuts + 1], 1)
    return _with_columns(cuts // seq_length, pieces)


def _with_columns(row: np.ndarray, pieces: np.ndarray) -> np.ndarray:
    """Add each piece's segment number and starting column within its row (pieces in row order)."""
    pairs = pieces[:, 2] - 1
    offset = np.cumsum(pairs) - pairs
    new_row = np.ones(len(row), bool)
    new_row[1:] = row[1:] != row[:-1]
    row_first = np.maximum.accumulate(np.where(new_row, np.arange(len(row)), 0))
    segment = np.arange(len(row)) - row_first + 1
    column = offset - offset[row_first]
    return np.column_stack([row, segment, pieces, column]).astype(np.int64)


def _fill(values: np.ndarray, mask: np.ndarray, starts: np.ndarray, placed: np.ndarray,
          seq_length: int) -> dict[str, np.ndarray]:
    """Copy every piece's (input, target, mask, segment) pairs into ``[R, T]`` arrays.

    One slice copy per piece: faster and far smaller than fancy indexing over all tokens.
    """
    shape = (int(placed[:, 0].max()) + 1, seq_length)
    inputs, targets = np.zeros(shape, np.int32), np.zeros(shape, np.int32)
    loss_mask, segments = np.zeros(shape, np.int8), np.zeros(shape, np.int32)
    begin = starts[placed[:, 2]] + placed[:, 3]
    for (row, segment, _, _, count, column), first in zip(placed.tolist(), begin.tolist()):
        end = column + count - 1
        inputs[row, column:end] = values[first : first + count - 1]
        targets[row, column:end] = values[first + 1 : first + count]
        loss_mask[row, column:end] = mask[first + 1 : first + count]
        segments[row, column:end] = segment
    return {"input_ids": inputs, "targets": targets, "loss_mask": loss_mask, "segment_ids": segments}


def _pack_stats(rows: Mapping[str, np.ndarray], placed: np.ndarray, num_examples: int,
                counts: Mapping[str, int]) -> dict[str, float]:
    real = int((rows["segment_ids"] > 0).sum())
    return {
        "num_examples": num_examples,
        "num_rows": int(rows["segment_ids"].shape[0]),
        "num_pieces": len(placed),
        "num_tokens": real,
        "num_supervised_tokens": int(rows["loss_mask"].sum(dtype=np.int64)),
        "fill_rate": real / rows["segment_ids"].size,
        **counts,
    }


def _batch(inputs_BT: np.ndarray, targets_BT: np.ndarray, mask_BT: np.ndarray,
           segments_BT: np.ndarray, positions_BT: np.ndarray, real_BT: np.ndarray,
           example_ids: np.ndarray) -> Batch:
    example_ids = np.asarray(example_ids, dtype=np.int32)
    real_rows = (example_ids >= 0)[:, None]
    return {
        "input_ids": np.asarray(inputs_BT, np.int32),
        "targets": np.asarray(targets_BT, np.int32),
        "loss_mask": (np.asarray(mask_BT) * real_rows).astype(np.float32),
        "segment_ids": np.asarray(segments_BT, np.int32),
        "positions": np.asarray(positions_BT, np.int32),
        "attention_mask": np.asarray(real_BT, np.int32),
        "example_id": example_ids,
    }
