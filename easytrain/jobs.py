"""Job reporting: one JSON file that tells a scheduler, a dashboard or a person what a run is doing.

`output_dir/job.json` holds the status (queued, running, completed, failed, stopped), the progress
from 0 to 100 mapped into `[progress_start, progress_end]`, an ETA, the latest metrics, data the user
added, and for a failure the error with its traceback. It is replaced atomically (temporary file, then
`os.replace`), so a reader never sees half a file, and a run killed with SIGKILL leaves its last state.

Every easytrain trainer reports into it (`easytrain.trainers.job_callback`). A hand-written loop runs
inside `job(...)`, used as a decorator or a `with` block, and calls `log_metric`, `progress_update`,
`add_job_data` and `should_stop`. A run stops cooperatively when the stop file appears in its output
directory or when a callback asks (`Job.request_stop`). Only the main process (`jax.process_index() ==
0`) writes files and calls listeners.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import numbers
import os
import socket
import time
import traceback
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

from easytrain.active_job import (activate, add_job_data, current_job, deactivate, log_metric, progress_update,
                                  should_stop)
from easytrain.errors import ArgumentError
from easytrain.job_records import JOB_FILENAME, OLDER_RUN_DATA, read_job, resumable_data
from easytrain.sinks import RunStatus, check_report_to, copy_json, json_scalars, write_json_atomically

__all__ = [
    "JOB_FILENAME", "STATUSES", "Job", "JobListener", "JobStatus", "add_job_data", "check_progress_range",
    "OLDER_RUN_DATA", "current_job", "job", "log_metric", "outcome_of", "progress_update", "read_job",
    "resumable_data", "should_stop",
]

STATUSES = ("queued", "running", "completed", "failed", "stopped")
JobStatus = Literal["queued", "running", "completed", "failed", "stopped"]
JobListener = Callable[[Mapping[str, Any]], None]

logger = logging.getLogger("easytrain")


def check_progress_range(start: float, end: float) -> None:
    """0 <= start <= end <= 100, naming the field at fault."""
    for name, value in (("progress_start", start), ("progress_end", end)):
        if not (isinstance(value, (int, float)) and math.isfinite(value) and 0 <= value <= 100):
            raise ArgumentError(name, f"must be a percentage in [0, 100], got {value!r}.")
    if start > end:
        raise ArgumentError("progress_end", f"must be >= progress_start={start}, got {end}.")


def outcome_of(error: BaseException) -> RunStatus:
    """'stopped' for a preemption (SIGTERM, SIGINT: exit 75, after a checkpoint or before the first step), Ctrl-C or
    a clean `sys.exit`; else 'failed'."""
    # imported here: easytrain.trainers imports this module
    from easytrain.trainers.preemption import TrainingPreempted

    if isinstance(error, (TrainingPreempted, KeyboardInterrupt)):
        return "stopped"
    if isinstance(error, SystemExit) and error.code in (None, 0):
        return "stopped"
    return "failed"


class Job(contextlib.ContextDecorator):
    """The state of one job, kept in `output_dir/job.json`; a context manager and a decorator.

    Entering writes status "queued"; the first progress report (`begin`, `progress_update`,
    `log_metric`, or a trainer's loop starting) makes it "running". Leaving normally makes it "completed",
    or "stopped" if a stop was requested before its progress reached `progress_end`; an exception makes it
    "failed" with the error and traceback ("stopped" for SIGTERM preemption, Ctrl-C and a clean `sys.exit`).
    As a decorator, every call of the function is a fresh job.

    Example:
        >>> @job("runs/mine", report_to=["jsonl", "csv"])  # doctest: +SKIP
        ... def train():
        ...     for step in range(1, 101):
        ...         log_metric("loss", 1.0 / step, step)
        ...         progress_update(step)
        ...         if should_stop():
        ...             break  # save a checkpoint first; the job ends as "stopped"
    """

    def __init__(self, output_dir: str | os.PathLike, *, name: str | None = None, progress_start: float = 0.0,
                 progress_end: float = 100.0, stop_file: str | None = "STOP",
                 report_to: Sequence[str] = ("jsonl",), run_config: Mapping[str, Any] | None = None,
                 listeners: Sequence[JobListener] = (), enabled: bool | None = None,
                 min_write_interval: float = 1.0, overwrite_metrics: bool = False):
        """Configures the job; nothing is written before it is entered.

        Args:
            output_dir: Receives `job.json` and the metric sinks' files; holds the stop file.
            name: Shown in the record; defaults to the output directory's name.
            progress_start, progress_end: The job's 0..100% maps into this range (a stage of a pipeline).
            stop_file: File name (relative to `output_dir`) whose appearance asks the job to stop; None: off.
            report_to: Sinks for `log_metric` (as `TrainingArguments.report_to`).
            run_config: Settings sent to W&B (config) and MLflow (params).
            listeners: Called with a copy of the record after every change (main process only).
            enabled: Whether this process writes; default `jax.process_index() == 0`, read on entering.
            min_write_interval: Seconds between writes of progress, metrics and data (status changes are
                written at once), so a fast loop does not spend its time rewriting the file.
            overwrite_metrics: A fresh job (not `begin(initial_step=N)`) removes another run's files of its sinks
                (`report_to`) at its first `log_metric`; without it, that call raises `OutputDirError`.
        """
        check_progress_range(progress_start, progress_end)
        check_report_to(list(report_to))
        self._options = dict(output_dir=output_dir, name=name, progress_start=progress_start,
                             progress_end=progress_end, stop_file=stop_file, report_to=report_to,
                             run_config=run_config, listeners=listeners, enabled=enabled,
                             min_write_interval=min_write_interval, overwrite_metrics=overwrite_metrics)
        self.output_dir = Path(output_dir)
        self.path = self.output_dir / JOB_FILENAME
        self.stop_path = self.output_dir / stop_file if stop_file else None
        self.progress_start, self.progress_end = float(progress_start), float(progress_end)
        self.listeners: list[JobListener] = list(listeners)
        self.enabled = enabled
        self.record: dict[str, Any] = {}
        self._name, self._report_to, self._run_config = name, list(report_to), run_config
        self._min_write_interval, self._overwrite_metrics = min_write_interval, overwrite_metrics
        self._reporter: Any = None  # the job's own easytrain.reporting.Reporter, opened by the first `log_metric`
        self._borrowed: Any = None  # a trainer's reporter, used instead while it trains (`use_reporter`)
        self._previous: dict[str, Any] | None = None
        self._stop_reason: str | None = None
        self._stop_by_file = False
        self._anchor: tuple[float, float] | None = None  # (time, percent) of the first progress after `begin`
        self._initial_step, self._total_steps = 0, None
        self._written_at = -math.inf
        self._value_steps: dict[str, dict[str, int]] = {}  # split -> metric -> the step its value in `record` is of

    # ------------------------------------------------------------------ lifecycle
    def _recreate_cm(self) -> Job:  # contextlib.ContextDecorator: a fresh job for every decorated call
        return Job(**self._options)

    def __enter__(self) -> Job:
        self.open()
        activate(self)
        return self

    def __exit__(self, exc_type: type[BaseException] | None, error: BaseException | None, tb: object) -> bool:
        try:
            if error is None:
                self.finish()
            else:
                self.fail(error)
        finally:
            deactivate(self)
        return False

    def open(self) -> None:
        """Write the "queued" record. A previous record of this directory (a killed, stopped or completed run,
        perhaps about to be resumed) keeps its progress until `begin` says from which step this run starts."""
        if self.enabled is None:
            import jax

            self.enabled = jax.process_index() == 0
        self._previous = read_job(self.output_dir)
        self._value_steps = {}
        now = time.time()
        self.record = {
            "name": self._name or self.output_dir.resolve().name, "status": "queued",
            "progress": float(self._previous.get("progress", self.progress_start)) if self._previous else
            self.progress_start,
            "progress_range": [self.progress_start, self.progress_end],
            "step": None, "total_steps": None, "eta_seconds": None, "metrics": {}, "data": {},
            "stop_reason": None, "error": None, "resumed_from_step": None, "pid": os.getpid(),
            "host": socket.gethostname(), "created_at": now, "started_at": None, "updated_at": now,
            "finished_at": None,
        }
        if self.enabled:
            self.output_dir.mkdir(parents=True, exist_ok=True)
        self._publish(force=True)

    def begin(self, *, total_steps: int | None = None, initial_step: int = 0, percent: float | None = None) -> None:
        """Mark the job "running" from `initial_step` (> 0: resumed from a checkpoint of that step).

        A resumed job keeps the data of the run it continues, and its progress starts at the restored step
        (from `total_steps`, or the previous record), never at zero. Sinks opened later by `log_metric`
        drop what the interrupted run logged after `initial_step`.
        """
        if not self.record:
            self.open()
        self._initial_step, self._total_steps = initial_step, total_steps
        previous = self._previous if initial_step > 0 else None
        if percent is None:
            if total_steps:
                percent = self._mapped(100.0 * initial_step / total_steps)
            else:
                percent = float(previous["progress"]) if previous else self.progress_start
        self.record.update(status="running", started_at=time.time(), progress=percent, eta_seconds=None,
                           step=initial_step, total_steps=total_steps, resumed_from_step=initial_step or None)
        if previous:
            self.record["data"] = {**resumable_data(previous), **self.record["data"]}
        self.record.pop(OLDER_RUN_DATA, None)  # a failed run's in this job (`keep_older_run`): this one may train
        self._anchor = None
        self._publish(force=True)

    def _ensure_running(self) -> None:
        """The first report of a job that was not begun explicitly begins it (from step 0)."""
        if self.record.get("status", "queued") == "queued":
            self.begin(total_steps=self._total_steps, initial_step=self._initial_step)

    @property
    def started(self) -> bool:
        """Whether the job began running (a trainer's loop started, or the first progress report)."""
        return self.record.get("started_at") is not None

    def finish(self, status: JobStatus | None = None, reason: str | None = None) -> None:
        """End the job: "completed" (progress at `progress_end`), or "stopped" if a stop was requested before its
        progress got there (a request at the last step had nothing left to stop)."""
        progress = self.record.get("progress", self.progress_start)
        reached_end = self.progress_end > self.progress_start and progress >= self.progress_end
        status = status or ("stopped" if self.stop_requested and not reached_end else "completed")
        if status == "completed":
            self.record.update(progress=self.progress_end, eta_seconds=0.0)
            if reason:
                self.end_early(reason)
        self._end(status, reason or self._stop_reason)

    def end_early(self, reason: str) -> None:
        """Record why the work ended before its last step by its own decision (a trainer's callback: early
        stopping): `reason` is the record's `stop_reason`, also once the job completes."""
        self.record["stop_reason"] = reason
        self._publish()

    def fail(self, error: BaseException) -> None:
        """End the job because of `error`: its type, message and traceback are recorded."""
        status = outcome_of(error)
        if status == "failed":
            trace = "".join(traceback.format_exception(type(error), error, error.__traceback__))
            self.record["error"] = {"type": type(error).__name__, "message": str(error), "traceback": trace}
        self._end(status, (str(error) or type(error).__name__) if status == "stopped" else None)

    def keep_older_run(self, older: Mapping[str, Any] | None = None) -> None:
        """This job's run ended before its first step, leaving the older run in output_dir in place (`held_run`):
        the record keeps that run's data (`OLDER_RUN_DATA`) for a later resume of it; how this job ends is
        recorded as ever. `older`: that run's record (default: the one this job found when it opened)."""
        if (older := older if older is not None else self._previous) is not None:
            self.record[OLDER_RUN_DATA] = resumable_data(older)
            self._publish(force=True)

    def _end(self, status: RunStatus, reason: str | None) -> None:
        kept = self.record.get("stop_reason") if status == "completed" else None  # `end_early`'s
        if status != "completed" and not self.started and self._previous is not None:  # it never began: nothing done
            self.record[OLDER_RUN_DATA] = resumable_data(self._previous)
        self.record.update(status=status, finished_at=time.time(), stop_reason=reason if status == "stopped" else kept)
        if status != "completed":
            self.record["eta_seconds"] = None  # it will not get there
        if self._reporter is not None:
            self._reporter.close(status)
        self._reporter = self._borrowed = None
        self._remove_stop_file(status)
        self._publish(force=True)

    def _remove_stop_file(self, status: RunStatus) -> None:
        """The stop file was meant for this run, which is over: one it found is removed however it ended, and so is
        one still there when it completed (too late to act on), so that the next start runs normally."""
        if self.enabled and self.stop_path is not None and (self._stop_by_file or status == "completed"):
            if status == "completed" and self.stop_path.exists():
                logger.info("removed the stop file %s, found once the run had nothing left to stop", self.stop_path)
            self.stop_path.unlink(missing_ok=True)

    # ------------------------------------------------------------------ progress and metrics
    def _mapped(self, percent: float) -> float:
        return self.progress_start + (self.progress_end - self.progress_start) * percent / 100.0

    def progress_update(self, percent: float, *, step: int | None = None) -> None:
        """Report the job's own progress, 0..100; written mapped into `[progress_start, progress_end]`. `step`, the
        steps done, is the record's `step` (else it stays where `begin` put it: a loop's steps are its own)."""
        if not (isinstance(percent, (int, float)) and 0 <= percent <= 100):
            raise ValueError(f"progress_update takes a percentage in [0, 100], got {percent!r}")
        if step is not None and (isinstance(step, bool) or not isinstance(step, numbers.Integral) or step < 0):
            raise ValueError(f"progress_update's step= is the number of steps done, an int >= 0, got {step!r}")
        self.set_progress(self._mapped(float(percent)), step=None if step is None else int(step))

    def set_progress(self, percent: float, *, step: int | None = None, total_steps: int | None = None) -> None:
        """Record an already mapped progress (a trainer maps its steps itself), and the ETA it implies.

        The ETA extrapolates the rate since the first report after `begin` (so compilation and data
        loading before it do not count) to `progress_end`.
        """
        self._ensure_running()
        now = time.monotonic()
        if self._anchor is None:
            self._anchor, eta = (now, percent), None
        else:
            done, elapsed = percent - self._anchor[1], now - self._anchor[0]
            eta = (self.progress_end - percent) * elapsed / done if done > 0 and elapsed > 0 else None
        self.record.update(progress=percent, eta_seconds=eta)
        if step is not None:
            self.record["step"] = step
        if total_steps is not None:
            self.record["total_steps"] = total_steps
        self._publish()

    def update_metrics(self, split: str, step: int, metrics: Mapping[str, Any], *, complete: bool = False) -> None:
        """Keep the latest `metrics` of `split` ("train", "eval", ...) in the record, with their step.

        `complete`: `metrics` is the whole record of `step` (a trainer's log or evaluation), so values of other steps
        are dropped: a field logged once (compile_seconds) must not sit under a later step. Values `log_metric` added
        at the same step stay. Otherwise (`log_metric`, one name at a time) they are added to the split's record."""
        latest = self.record["metrics"].setdefault(split, {})
        steps = self._value_steps.setdefault(split, {})
        if complete:
            for name in [name for name in latest if name != "step" and steps.get(name) != int(step)]:
                del latest[name]
        values = json_scalars(metrics)
        latest.update({"step": int(step), **values})
        steps.update(dict.fromkeys(values, int(step)))
        self._publish()

    def log_metric(self, name: str, value: float, step: int, split: str = "train") -> None:
        """Send one metric at global `step` to the job's sinks (`report_to`; a trainer's while it trains) and keep
        it in the record."""
        self._ensure_running()
        reporter = self._borrowed if self._borrowed is not None else self._own_reporter()
        reporter.log(step, {name: value}, split=split)
        self.update_metrics(split, step, {name: value})

    def _own_reporter(self) -> Any:
        """The job's sinks (`report_to`), opened by the first `log_metric` that is not a trainer's."""
        if self._reporter is None:
            # imported here: reporting imports rich, which a job without metrics never needs
            from easytrain.reporting import Reporter, claim_log_files

            if self.enabled and self._initial_step == 0:  # a fresh job: another run's logs would get its steps twice
                claim_log_files(self.output_dir, self._report_to, overwrite=self._overwrite_metrics)
            self._reporter = Reporter(output_dir=self.output_dir, report_to=self._report_to,
                                      total_steps=self._total_steps or 0, initial_step=self._initial_step,
                                      enabled=bool(self.enabled), show_progress=False, run_config=self._run_config)
        return self._reporter

    def use_reporter(self, reporter: Any) -> Any:
        """Send `log_metric` to a reporter someone else opened and closes (a trainer's, while it trains) instead
        of the job's own sinks; None: back to those. Returns the one it replaces, to give back afterwards."""
        previous, self._borrowed = self._borrowed, reporter
        return previous

    def add_job_data(self, key: str, value: Any) -> None:
        """Store `value` (JSON-serializable) under `data[key]` in the record; kept across a resume."""
        try:
            json.dumps(value, allow_nan=False)
        except (TypeError, ValueError) as error:
            raise TypeError(f"add_job_data({key!r}, ...): the value must be JSON-serializable (it is written to "
                            f"{JOB_FILENAME}); {error}") from error
        self.record["data"][str(key)] = value
        self._publish()

    # ------------------------------------------------------------------ stopping
    def request_stop(self, reason: str = "requested by a callback") -> None:
        """Ask the run to stop at the next step (a trainer checkpoints first); it ends as "stopped"."""
        if self._stop_reason is None:
            self._stop_reason = reason

    def should_stop(self) -> bool:
        """Whether a stop was requested or the stop file exists; cheap enough to call every step."""
        if self._stop_reason is None and self.stop_path is not None and self.stop_path.exists():
            self._stop_reason, self._stop_by_file = f"stop file {self.stop_path} found", True
        return self._stop_reason is not None

    @property
    def stop_requested(self) -> bool:
        return self._stop_reason is not None

    @property
    def stop_reason(self) -> str | None:
        """Why a stop was requested (the stop file, `request_stop`'s reason), or None."""
        return self._stop_reason

    # ------------------------------------------------------------------ writing
    def flush(self) -> None:
        """Write the record now, whatever the interval (a trainer does at every checkpoint)."""
        if self.enabled and self.record:
            write_json_atomically(self.path, self.record)
            self._written_at = time.monotonic()

    def _publish(self, force: bool = False) -> None:
        """Tell the listeners; write the file at once for status changes, else at most every interval."""
        self.record["updated_at"] = time.time()
        if not self.enabled:
            return
        for listener in list(self.listeners):
            listener(copy_json(self.record))
        if force or time.monotonic() - self._written_at >= self._min_write_interval:
            self.flush()


job = Job  # `@job(...)` / `with job(...) as j:` read better than the class name
