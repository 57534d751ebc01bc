"""When an evaluation or a checkpoint is due: after which optimizer updates, by its strategy."""

from __future__ import annotations


def is_due(step: int, strategy: str, every: int, steps_per_epoch: int) -> bool:
    """Whether an eval/save with this strategy happens after optimizer update `step`."""
    if strategy == "steps":
        return step % every == 0
    if strategy == "epoch":
        return step % steps_per_epoch == 0
    return False
