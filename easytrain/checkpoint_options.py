"""How `easytrain.checkpoint.CheckpointManager` opens Orbax's manager: its options for a run's own directory
(asynchronous saves, retention, clean-up of a crashed run's half-written saves) and for a reader's (read-only,
quiet)."""

from __future__ import annotations

import contextlib
import functools
import logging
from collections.abc import Iterator

import jax
import orbax.checkpoint as ocp

from easytrain import save_barrier
from easytrain.retention import metric_value, preservation_policy

# Orbax's read-only mode, with the options it would otherwise reset (and warn about) stated as it sets them; opened
# without reading every step's metadata (times and metrics that only retention, which a reader never runs, uses).
_READ_ONLY = {"read_only": True, "save_interval_steps": 0, "create": False, "lightweight_initialize": True}


def manager_options(max_to_keep: int | None, *, async_save: bool, best_metric: str | None, greater_is_better: bool,
                    owner: bool, read_only: bool) -> ocp.CheckpointManagerOptions:
    """Orbax's options for a manager of these settings (`CheckpointManager`'s arguments)."""
    return ocp.CheckpointManagerOptions(
        enable_async_checkpointing=async_save,
        # A best_fn only makes Orbax persist metrics, so the ranking survives a
        # restart; which steps are kept is decided by the preservation policy.
        best_fn=functools.partial(metric_value, name=best_metric) if best_metric else None,
        best_mode="max" if greater_is_better else "min",
        preservation_policy=None if read_only else preservation_policy(max_to_keep, best_metric, greater_is_better),
        cleanup_tmp_directories=owner,
        async_options=ocp.AsyncOptions(barrier_sync_fn=save_barrier.barrier) if jax.process_count() > 1 else None,
        **_READ_ONLY if read_only else {},
    )


class _ReadOnlyNotice(logging.Filter):
    """Drops Orbax's warning that a directory was opened read-only: every resume opens one so, on purpose."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "read only" not in record.getMessage()


@contextlib.contextmanager
def quiet_read_only_notice() -> Iterator[None]:
    """Orbax's notice of a read-only directory left out while a manager opens."""
    notice = _ReadOnlyNotice()
    logging.getLogger("absl").addFilter(notice)
    try:
        yield
    finally:
        logging.getLogger("absl").removeFilter(notice)
