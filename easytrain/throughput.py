"""Throughput and efficiency of a logging window, from host-side counts only.

Every number here comes from the host batches (counted when they are dispatched) and the window's
wall-clock time, so logging them adds no device-to-host transfer: `step_time`, `tokens_per_second`,
`samples_per_second`, `padding_efficiency` and `mfu`.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, NamedTuple, Sequence

import numpy as np

from easytrain.flops import PeakFlops


class BatchCounts(NamedTuple):
    """What one process's host batch of one step holds, counted on the host.

    `tokens` feeds `tokens_per_second` (the trainer's `count_tokens`); `real_tokens` / `token_slots`
    `padding_efficiency` (`count_token_slots`); `model_flops` `mfu` (`model_flops`). Zeros: not known.
    `samples` feeds `samples_per_second` (`count_samples`); None: not counted, the step's share of the global batch.
    """

    tokens: int = 0
    real_tokens: int = 0
    token_slots: int = 0
    model_flops: float = 0.0
    samples: int | None = None


def batch_rows(batch: Mapping[str, Any]) -> int | None:
    """Rows of a host batch: the leading axis of its first array field, NumPy or JAX (every field holds one row per
    example); None for a batch without one (the window then counts the global batch size)."""
    return next((int(np.shape(value)[0]) for value in batch.values() if len(getattr(value, "shape", ()))), None)


def token_slots(batch: Mapping[str, Any]) -> tuple[int, int]:
    """(real tokens, token slots) of a token batch; (0, 0) for a batch without `input_ids`.

    A slot is real if it is attended (`attention_mask`) or supervised (`loss_mask`); a batch with
    neither mask has no padding.
    """
    if "input_ids" not in batch:
        return 0, 0
    slots = int(np.size(batch["input_ids"]))
    masks = [np.asarray(batch[key]) > 0 for key in ("attention_mask", "loss_mask") if key in batch]
    if not masks:
        return slots, slots
    return int(np.count_nonzero(np.logical_or.reduce(masks))), slots


def window_logs(counts: Sequence[BatchCounts], *, seconds: float, rows_per_step: int, process_count: int,
                peak: Callable[[], PeakFlops | None]) -> dict[str, float]:
    """Throughput of `len(counts)` steps that took `seconds` of wall-clock time.

    `counts` are this process's; token, sample and FLOP totals are scaled by `process_count` (every process
    holds an equal share of the global batch). `rows_per_step` (the global batch size) stands for the samples of a
    step that did not count them. `peak` is called only when the window has model FLOPs. Fields with nothing to
    count are left out (`samples_per_second` is always logged).
    """
    seconds = max(seconds, 1e-9)
    logs = {"step_time": seconds / max(len(counts), 1)}
    tokens = sum(count.tokens for count in counts) * process_count
    if tokens:
        logs["tokens_per_second"] = tokens / seconds
    samples = sum(rows_per_step if count.samples is None else count.samples * process_count for count in counts)
    logs["samples_per_second"] = samples / seconds  # rows (packed or not), unless a trainer counts otherwise
    slots = sum(count.token_slots for count in counts)
    if slots:
        logs["padding_efficiency"] = sum(count.real_tokens for count in counts) / slots
    model_flops = sum(count.model_flops for count in counts) * process_count
    if model_flops and (hardware := peak()) is not None:
        logs["mfu"] = model_flops / seconds / hardware.flops_per_second
    return logs
