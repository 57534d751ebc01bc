"""`non_finite_policy='stop'`: find the first skipped update in a logged window and say what to do about it.

The train step skips a non-finite update on the device and counts it in `skipped_steps`; the host sees the count
only when a window's metrics are fetched, by then one step later when the log was deferred. The loop checkpoints the
(finite) state it holds and raises the error worded here.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from easytrain.errors import NonFiniteLossError


def first_skipped(window: Sequence[tuple], fetched: Iterable[Mapping[str, Any]]) -> tuple[int, Any] | None:
    """The step and batch example ids (None: the batch has none) of the window's first skipped update, if any.

    `window` holds the loop's pending `(step, metrics, example_ids, counts)` entries, `fetched` their metrics on
    the host, in the same order."""
    for (step, _, example_ids, _), metrics in zip(window, fetched):
        if int(metrics["skipped_steps"].result()):
            return step, example_ids
    return None


def stop_error(step: int, example_ids: Any, checkpointed: int) -> NonFiniteLossError:
    """The error of a run stopped at the skipped update of `step`, the state after `checkpointed` checkpointed."""
    batch = "" if example_ids is None else f" (batch example ids {list(map(int, example_ids))})"
    return NonFiniteLossError(
        f"non-finite loss or gradient at step {step}{batch}; that update was skipped and the state after step "
        f"{checkpointed} was checkpointed. Inspect those examples, lower learning_rate, or set "
        "non_finite_policy='skip'.")
