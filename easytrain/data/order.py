"""Which rows a global step holds: the loaders' data order, a pure function of ``(seed, step)``.

Epoch ``e`` visits the rows in a permutation seeded by ``(seed, e)``; global batch ``k`` of an epoch takes the next
``global_batch_size`` rows of it, and process ``p`` keeps its contiguous slice of ``local_batch_size`` rows. Nothing
here depends on how many processes share a batch except which slice each keeps, so a saved step resumes on any
number of them.
"""

from __future__ import annotations

import functools
import logging

import numpy as np

from easytrain.data.errors import DataError

logger = logging.getLogger("easytrain")


def per_process_batch_size(global_batch_size: int, process_index: int, process_count: int) -> int:
    """Rows per process per step, checking the split is even and the index valid."""
    if global_batch_size < 1:
        raise DataError(f"`global_batch_size` must be at least 1, got {global_batch_size}.")
    if not 0 <= process_index < process_count:
        raise DataError(
            f"`process_index` must be in [0, process_count={process_count}), got {process_index}."
        )
    if global_batch_size % process_count:
        raise DataError(
            f"`global_batch_size` {global_batch_size} is not divisible by "
            f"`process_count` {process_count}; use a multiple of {process_count}."
        )
    return global_batch_size // process_count


class StepRows:
    """This process's row indices for a global step: a pure function of (seed, step).

    Each epoch's order is one numpy permutation seeded by ``(seed, epoch)``,
    computed once and cached; grain's per-index shuffle would cost up to
    milliseconds per row on the small datasets this library often trains on.
    """

    def __init__(
        self,
        num_rows: int,
        global_batch_size: int,
        local_batch_size: int,
        seed: int,
        process_index: int,
    ) -> None:
        self._num_rows = num_rows
        self._global_batch_size = global_batch_size
        self._local_batch_size = local_batch_size
        self._seed = seed
        self._offset = process_index * local_batch_size
        self._steps_per_epoch = num_rows // global_batch_size
        # Two epochs: prefetching across an epoch boundary needs both at once.
        self._permutation = functools.lru_cache(maxsize=2)(self._shuffle)

    def __call__(self, step: int) -> np.ndarray:
        epoch, step_in_epoch = divmod(step, self._steps_per_epoch)
        start = step_in_epoch * self._global_batch_size + self._offset
        return self._permutation(epoch)[start : start + self._local_batch_size]

    def _shuffle(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([self._seed, epoch]).permutation(self._num_rows)


def warn_rows_left_out(num_rows: int, global_batch_size: int, total_steps: int) -> None:
    """Every epoch takes whole global batches of its permutation, so `num_rows % global_batch_size` rows (other
    ones each epoch) are not trained on in it; warned once at set-up when the run reaches an epoch's end."""
    per_epoch, left_out = divmod(num_rows, global_batch_size)
    if not left_out or not per_epoch or total_steps < per_epoch:
        return
    logger.warning("train_batch_size=%d does not divide the %d training rows: each epoch trains on %d of them (%d "
                   "steps) and leaves out %d, other ones each epoch (every epoch is shuffled anew). To train on every "
                   "row each epoch, use a train_batch_size that divides the rows, or add or drop rows.",
                   global_batch_size, num_rows, per_epoch * global_batch_size, per_epoch, left_out)


def grain_state(step: int) -> dict[str, int]:
    """Build grain's iterator state, which for a ``MapDataset`` is the next element's index.

    Each element here is one global step, so the step is the whole state.
    """
    return {"next_index": step}
