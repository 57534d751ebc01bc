"""A finished run started again, and one a callback ended early: the loop's bookkeeping for both.

A checkpoint's `progress` item holds the last train logs beside the callbacks' states, so a run resumed with nothing
left to train (a requeued job, an early-stopped run) returns them from `train()`, and `results.json` keeps its
`train_*` fields. A run a callback stopped before its last step says so in one line, with the callback's reason."""

from __future__ import annotations

import logging
import numbers
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from easytrain.callbacks import CallbackList
from easytrain.checkpoint import CheckpointManager

logger = logging.getLogger("easytrain")

#: The key of the last train logs in a checkpoint's `progress` item, beside the callbacks' states.
TRAIN_LOGS = "train_logs"


def progress(callbacks: CallbackList, last_logs: Mapping[str, Any]) -> dict[str, Any]:
    """A checkpoint's `progress` item: the callbacks' states and the last train logs (as floats, NaN kept), which
    a run resumed there returns if it trains nothing more."""
    logs = {name: float(value) for name, value in last_logs.items() if isinstance(value, numbers.Real)}
    return {"callbacks": callbacks.state_dict(), TRAIN_LOGS: logs}


def warn_if_nothing_left(resumed: bool, start_step: int, total_steps: int) -> None:
    """A resumed run at or past its last step trains nothing: say how to train on."""
    if resumed and start_step >= total_steps:
        logger.warning("resumed at step %d, and this run ends at step %d (max_steps, num_train_epochs): nothing "
                       "left to train; raise --max_steps to train on", start_step, total_steps)


def saved_train_logs(checkpoint: str | None, manager: CheckpointManager) -> dict[str, float]:
    """The last train logs stored with `checkpoint` (a `.../<step>` directory; None: a fresh run), read with the
    run's own `manager` when it lives there; empty for checkpoints written before they were stored."""
    if checkpoint is None:
        return {}
    path = Path(checkpoint).absolute()
    if path.parent == manager.directory:
        progress = manager.read_progress(int(path.name))
    else:
        with CheckpointManager(path.parent, read_only=True) as other:
            progress = other.read_progress(int(path.name))
    return {name: float(value) for name, value in progress.get(TRAIN_LOGS, {}).items()}


def log_early_stop(callbacks: CallbackList, stopped: bool, step: int, total_steps: int) -> None:
    """One line for a run a callback (`trainer.should_stop`) ended before its last step, with the reason one gave."""
    if stopped and step < total_steps:
        reason = callbacks.stop_reason() or "a callback set trainer.should_stop"
        logger.info("training stopped after step %d of %d: %s", step, total_steps, reason)
