"""The job `log_metric` and friends report into: the innermost `easytrain.jobs.job` block, decorated call or trainer
`train()` being run in this process (a stack, since a trainer's job may run inside a script's own)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from easytrain.jobs import Job

_ACTIVE: list[Job] = []  # innermost last; `log_metric` and friends report into `_ACTIVE[-1]`


def current_job() -> Job | None:
    """The innermost job being run (a `job` block or decorated call, or a trainer's `train()`), or None."""
    return _ACTIVE[-1] if _ACTIVE else None


def _active(function: str) -> Job:
    if not _ACTIVE:
        raise RuntimeError(f"{function}() reports into the running job, and there is none: call it inside a "
                           "function decorated with @easytrain.jobs.job(output_dir), a `with job(output_dir):` "
                           "block, or a trainer's train()")
    return _ACTIVE[-1]


def activate(active: Job) -> None:
    """Make `active` the job that `log_metric` and friends report into, until `deactivate`."""
    _ACTIVE.append(active)


def deactivate(active: Job) -> None:
    if active in _ACTIVE:
        _ACTIVE.remove(active)


def log_metric(name: str, value: float, step: int, split: str = "train") -> None:
    """Send `name=value` at global `step` to every sink of the running job (`report_to`)."""
    _active("log_metric").log_metric(name, value, step, split)


def progress_update(percent: float, *, step: int | None = None) -> None:
    """Report the running job's progress, 0..100 (mapped into its `[progress_start, progress_end]`), and with `step`
    the steps done (its record's `step`)."""
    _active("progress_update").progress_update(percent, step=step)


def add_job_data(key: str, value: Any) -> None:
    """Store a JSON-serializable `value` under `data[key]` in the running job's record."""
    _active("add_job_data").add_job_data(key, value)


def should_stop() -> bool:
    """Whether the running job was asked to stop (stop file or `request_stop`): save, then leave the loop."""
    return _active("should_stop").should_stop()
