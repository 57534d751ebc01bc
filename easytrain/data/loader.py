"""Deterministic, resumable, per-process batches built on grain.

Training data order is a pure function of ``(seed, global step)``: epoch ``e``
visits the rows in a permutation seeded by ``(seed, e)``, global batch ``k``
takes the next ``global_batch_size`` rows of it, and process ``p`` keeps its
contiguous slice (`easytrain.data.order`). The pipeline is a grain ``MapDataset`` with one element per
global step, so an iterator's state is just the next step: resuming jumps
straight there without reading (or replaying) any earlier batch, and works
for any number of processes, since the global order does not depend on how
many processes share it.
"""

from __future__ import annotations

import functools
import math
import sys
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, TypeAlias

import grain
import numpy as np

from easytrain.data.batch_checks import TOKEN_FIELDS, BatchCheck
from easytrain.data.digest import rows_digests
from easytrain.data.errors import DataError
from easytrain.data.float_digest import report_float_changes
from easytrain.data.order import StepRows, grain_state, per_process_batch_size
from easytrain.data.position import DIGEST_KEY, FLOATS_KEY, check_same_settings
from easytrain.data.lm import Batch, lm_collate_rows
from easytrain.data.row_reader import RowReader, RowSource

#: Builds a batch from rows (column -> ``[N, ...]``) and their row indices ``[N]``.
RowsCollate: TypeAlias = Callable[[Mapping[str, np.ndarray], np.ndarray], Batch]

# A couple of reader threads keep the next batches ready while the device works;
# grain returns results in order, so threading never changes what is produced,
# though `collate` runs there, ahead of the step and out of order (so it keeps no state).
_READER_THREADS = 2
_BATCHES_AHEAD = 4

_ENDLESS = sys.maxsize


class TrainBatches:
    """Endless, reshuffled-every-epoch training batches for one process.

    Each epoch drops its last partial global batch so every step has the same
    static shape. Only this process's rows are ever read from the source.
    """

    def __init__(
        self,
        source: RowSource,
        global_batch_size: int,
        seed: int,
        *,
        collate: RowsCollate = lm_collate_rows,
        process_index: int = 0,
        process_count: int = 1,
        read_options: grain.ReadOptions | None = None,
        vocab_size: int | None = None,
        token_fields: Sequence[str] = TOKEN_FIELDS,
    ) -> None:
        """Plan the batches; nothing is read until an iterator is advanced.

        Args:
            source: Rows to train on; a ``datasets.Dataset`` is read in numpy format.
            global_batch_size: Rows per step summed over all processes.
            seed: Fixes every epoch's order, so a run is reproducible.
            collate: Turns this process's rows and row indices into a batch; called on
                the reader threads, ahead of the step and in no fixed order, so it
                must be a pure function of its arguments.
            process_index: Which process this is, in ``[0, process_count)``.
            process_count: Number of processes sharing each global batch.
            read_options: grain reader threads and prefetch depth; ``None`` reads
                with two threads, four batches ahead.
            vocab_size: The model's vocabulary size: every collated batch's
                ``token_fields`` are checked to lie in ``[0, vocab_size)``
                (``easytrain.data.batch_checks``); None checks none.
            token_fields: The batch fields that hold token ids.

        Raises:
            DataError: Bad batch, seed or process settings, or fewer rows than one
                global batch; at a batch, a collate's bad rows or token ids.
        """
        check = BatchCheck(vocab_size, token_fields)
        self._reader = RowReader(source, whole_copy=process_count == 1)
        self.global_batch_size = global_batch_size
        self.local_batch_size = per_process_batch_size(global_batch_size, process_index, process_count)
        self.steps_per_epoch = len(self._reader) // global_batch_size
        if self.steps_per_epoch == 0:
            raise DataError(
                f"The training dataset has {len(self._reader)} rows, but one global batch "
                f"needs {global_batch_size} (`train_batch_size`); add data, raise or unset "
                "`max_train_samples` if it is set, or lower `train_batch_size`."
            )
        if seed < 0:
            raise DataError(f"`seed` must be non-negative, got {seed}.")
        self.seed = seed
        self._source = source
        rows = StepRows(
            len(self._reader), global_batch_size, self.local_batch_size, seed, process_index
        )
        load = functools.partial(_load_batch, self._reader, collate, check)
        steps = grain.MapDataset.range(_ENDLESS)  # element k is global step k
        self._batches = steps.map(rows).map(load).to_iter_dataset(_or_default(read_options))

    @property
    def num_rows(self) -> int:
        return len(self._reader)

    @functools.cached_property
    def _digests(self) -> tuple[str, dict[str, Any]]:
        return rows_digests(self._source)

    @property
    def data_digest(self) -> str:
        """The content digest of every row (not only this process's: each process holds them all), computed once."""
        return self._digests[0]

    @property
    def float_columns(self) -> dict[str, Any]:
        """The record of the float columns the digest leaves out (`easytrain.data.float_digest`); empty if none."""
        return self._digests[1]

    @property
    def fingerprint(self) -> dict[str, Any]:
        """The settings and the rows a saved data position depends on (`TrainIterator.get_state` records them): the
        same seed and batch size over other rows of the same count would pick other examples at every step."""
        return {"seed": self.seed, "global_batch_size": self.global_batch_size, "num_rows": self.num_rows,
                DIGEST_KEY: self.data_digest}

    @property
    def rows_read(self) -> int:
        """Rows fetched from the source so far, over all iterators (prefetch included)."""
        return self._reader.rows_read

    def epoch_of(self, step: int) -> int:
        """The epoch a global step belongs to."""
        return step // self.steps_per_epoch

    def iterator(self, start_step: int = 0) -> TrainIterator:
        """An endless iterator whose first batch is global step ``start_step``."""
        return TrainIterator(iter(self._batches), self.fingerprint, start_step, self.float_columns or None)


class TrainIterator(Iterator[Batch]):
    """Training batches from some global step on, checkpointable as that step.

    ``get_state`` returns JSON-serialisable data that also records the data
    settings and the rows' digest, so restoring into a loader with another
    seed, batch size or dataset fails loudly instead of silently changing the
    data order; and the float columns' record, whose changes are only logged.
    """

    def __init__(self, batches: grain.DatasetIterator, fingerprint: Mapping[str, Any], start_step: int,
                 float_columns: Mapping[str, Any] | None = None) -> None:
        self._batches = batches
        self._fingerprint = dict(fingerprint)
        self._floats = {FLOATS_KEY: dict(float_columns)} if float_columns else {}
        self._step = 0
        self.set_state({**self._fingerprint, "step": start_step})

    @property
    def step(self) -> int:
        """The global step of the next batch."""
        return self._step

    def __next__(self) -> Batch:
        batch = next(self._batches)
        self._step += 1
        return batch

    def get_state(self) -> dict[str, Any]:
        """Where to resume: the next global step plus the settings it depends on."""
        return {"step": self._step, **self._fingerprint, **self._floats}

    def set_state(self, state: Mapping[str, Any]) -> None:
        """Continue from ``state["step"]``; O(1), nothing earlier is read."""
        check_same_settings(state, self._fingerprint)
        step = int(state["step"])
        if step < 0:
            raise DataError(f"Data state has negative step {step}; pass a saved state.")
        report_float_changes(state.get(FLOATS_KEY), self._floats.get(FLOATS_KEY))
        self._batches.set_state(grain_state(step))
        self._step = step

    def close(self) -> None:
        """Stop the prefetch threads."""
        self._batches.close()

    def __enter__(self) -> TrainIterator:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def eval_batches(
    source: RowSource,
    global_batch_size: int,
    *,
    collate: RowsCollate = lm_collate_rows,
    process_index: int = 0,
    process_count: int = 1,
    read_options: grain.ReadOptions | None = None,
    vocab_size: int | None = None,
    token_fields: Sequence[str] = TOKEN_FIELDS,
) -> Iterator[Batch]:
    """One ordered pass over ``source`` in static-shape batches.

    The last global batch is padded with copies of row 0 handed to ``collate``
    with example id -1, which must give them zero weight (the language-model
    collate zeroes their ``loss_mask``): the shape never changes (no
    recompiles), every example counts exactly once, and padded rows hold real
    data so they cannot produce NaNs that a zero weight would not cancel.

    Args:
        source: Rows to evaluate; a ``datasets.Dataset`` is read in numpy format.
        global_batch_size: Rows per step summed over all processes.
        collate: Turns this process's rows and row indices into a batch (on the
            reader threads, ahead of the step: a pure function of its arguments).
        process_index: Which process this is, in ``[0, process_count)``.
        process_count: Number of processes sharing each global batch.
        read_options: grain reader threads and prefetch depth; ``None`` reads
            with two threads, four batches ahead.
        vocab_size, token_fields: As for ``TrainBatches``.

    Returns:
        An iterator of ``ceil(len(source) / global_batch_size)`` batches, the
        same count on every process.

    Raises:
        DataError: An empty source or bad batch or process settings.
    """
    check = BatchCheck(vocab_size, token_fields)
    reader = RowReader(source, whole_copy=process_count == 1)
    local_batch_size = per_process_batch_size(global_batch_size, process_index, process_count)
    if len(reader) == 0:
        raise DataError("The evaluation dataset has no rows; give it at least one.")
    num_steps = math.ceil(len(reader) / global_batch_size)
    positions = grain.MapDataset.range(num_steps * global_batch_size)  # past the end = padding
    indices = positions.batch(local_batch_size)[process_index::process_count]
    load = functools.partial(_load_padded_batch, reader, collate, check)
    return iter(indices.map(load).to_iter_dataset(_or_default(read_options)))


#: Eval batches of up to this many rows never shrink to a set: a compile costs more than the padding.
PADDED_EVAL_ROWS = 64


def eval_batch_rows(num_rows: int, batch_size: int, step: int = 1) -> int:
    """The rows of each batch of an eval set of `num_rows`: `batch_size`, so that every set shares one compiled eval
    step; or, if smaller, the least `step * 2**k` holding the set and `PADDED_EVAL_ROWS`, so that a huge
    `eval_batch_size` does not pad a small set into a batch that may not fit (38 rows under 100000), and the sizes
    between share a few shapes. `step` divides `batch_size`: the data-parallel devices and the processes.
    Padding rows weigh nothing: metrics are the set's own up to float rounding (XLA may sum a row's products in
    another order in a batch of another size; `tests/test_eval_batch_shapes.py`)."""
    rows = step
    while rows < max(num_rows, PADDED_EVAL_ROWS):
        rows *= 2
    return min(batch_size, rows)


class EvalBatches:
    """A re-iterable evaluation set: every ``iter()`` is one ordered pass (see ``eval_batches``)."""

    def __init__(self, source: RowSource, global_batch_size: int, *, collate: RowsCollate = lm_collate_rows,
                 process_index: int = 0, process_count: int = 1, multiple_of: int = 1, vocab_size: int | None = None,
                 token_fields: Sequence[str] = TOKEN_FIELDS) -> None:
        """`multiple_of`: the data-parallel device count. Batches hold `global_batch_size` rows, padded (one eval
        step for every set), unless `eval_batch_rows` shrinks them. `vocab_size`, `token_fields`: as for
        `TrainBatches`."""
        BatchCheck(vocab_size, token_fields)  # a bad vocab_size fails now
        self.source = source
        step = math.lcm(multiple_of, process_count)
        self.global_batch_size = eval_batch_rows(len(RowReader(source)), global_batch_size, step)
        self._options = dict(collate=collate, process_index=process_index, process_count=process_count,
                             vocab_size=vocab_size, token_fields=token_fields)
        per_process_batch_size(global_batch_size, process_index, process_count)  # fail now, not at the first eval

    def __iter__(self) -> Iterator[Batch]:
        return eval_batches(self.source, self.global_batch_size, **self._options)

    def __len__(self) -> int:
        return math.ceil(len(RowReader(self.source)) / self.global_batch_size)


def count_rows(source: RowSource) -> int:
    """Rows of a training or eval source, as the loaders count them."""
    return len(RowReader(source))


def _or_default(read_options: grain.ReadOptions | None) -> grain.ReadOptions:
    if read_options is not None:
        return read_options
    return grain.ReadOptions(num_threads=_READER_THREADS, prefetch_buffer_size=_BATCHES_AHEAD)


def _load_batch(reader: RowReader, collate: RowsCollate, check: BatchCheck, indices: np.ndarray) -> Batch:
    example_ids = indices.astype(np.int32)
    return check(collate(reader.read(indices), example_ids), example_ids)


def _load_padded_batch(reader: RowReader, collate: RowsCollate, check: BatchCheck, indices: np.ndarray) -> Batch:
    """Collate the real rows, filling positions past the end with copies of row 0 whose example id is
    -1; the collate gives those rows zero weight (it knows which fields weigh)."""
    real = indices < len(reader)
    example_ids = np.where(real, indices, -1).astype(np.int32)
    return check(collate(reader.read(np.where(real, indices, 0)), example_ids), example_ids)

