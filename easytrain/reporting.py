"""Metric reporting: console progress, TensorBoard events, a JSONL log, and the sinks of `easytrain.sinks`
(CSV, Weights & Biases, MLflow).

Every sink takes the explicit global step, so a resumed run continues the same
curves: on resume, entries written after the restored step by the interrupted
run are dropped (JSONL, CSV), superseded (TensorBoard ``purge_step``) or not sent
again (W&B and MLflow, whose histories are append-only).
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Protocol

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from easytrain.errors import OutputDirError
from easytrain.linked_logs import WrittenLog, opened
from easytrain.sinks import (
    CSV_FILENAME,
    REPORT_TO_CHOICES,
    CsvSink,
    MlflowSink,
    RunStatus,
    WandbSink,
    check_report_to,
    metric_tag,
    replace_through_link,
    strict_json,
)

__all__ = [
    "CSV_FILENAME",
    "METRICS_FILENAME",
    "REPORT_TO_CHOICES",
    "TENSORBOARD_DIRNAME",
    "LOG_NAMES",
    "Reporter",
    "claim_log_files",
    "format_metrics",
    "holds_records",
    "parse_report_to",
    "progress_description",
    "tensorboard_tag",
    "truncate_jsonl",
]

METRICS_FILENAME = "metrics.jsonl"
TENSORBOARD_DIRNAME = "tensorboard"
#: The local sinks' logs in output_dir, by sink (`run_dir.run_outputs`, `run_dir.STARTED_RUN_LOGS`).
LOG_NAMES = {"jsonl": METRICS_FILENAME, "csv": CSV_FILENAME, "tensorboard": TENSORBOARD_DIRNAME}
_DESCRIPTION_KEYS = (("loss", "loss"), ("learning_rate", "lr"))


# ----------------------------------------------------------------------------- pure helpers


def parse_report_to(report_to: str | Sequence[str]) -> frozenset[str]:
    """Validates ``report_to`` and returns the sinks to enable besides the console.

    Raises:
        ArgumentError (a ValueError): an unknown value, "none" combined with a sink, or a sink whose
            optional package is not installed (the message names the pip extra).
    """
    return check_report_to([report_to] if isinstance(report_to, str) else list(report_to))


def format_value(value: float) -> str:
    """Four significant digits, but large counts (tokens, throughput) as whole numbers."""
    return f"{value:.0f}" if 1e4 <= abs(value) < 1e15 else f"{value:.4g}"


def format_metrics(metrics: Mapping[str, float]) -> str:
    """``name value`` pairs for one compact console line."""
    return "  ".join(f"{name} {format_value(value)}" for name, value in metrics.items())


def _with_si_suffix(value: float) -> str:
    for threshold, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= threshold:
            return f"{value / threshold:.1f}{suffix}"
    return f"{value:.0f}"


def progress_description(metrics: Mapping[str, float]) -> str:
    """Short progress-bar label from loss, learning rate and throughput, when present."""
    parts = [f"{label} {format_value(metrics[key])}" for key, label in _DESCRIPTION_KEYS if key in metrics]
    if "tokens_per_second" in metrics:
        parts.append(f"{_with_si_suffix(metrics['tokens_per_second'])} tok/s")
    return " · ".join(parts)


tensorboard_tag = metric_tag  # the same tags in TensorBoard, W&B and MLflow


def _step_of(line: str) -> int | None:
    """Step of one JSONL line, or None for a torn/garbled line."""
    try:
        return int(json.loads(line)["step"])
    except (ValueError, KeyError, TypeError):
        return None


def truncate_jsonl(path: Path, last_step: int) -> None:
    """Atomically drops lines with ``step > last_step`` (and torn lines) from ``path``; a link (logs kept on another
    disk) stays a link, its target rewritten (`sinks.replace_through_link`)."""
    if not path.exists():
        return
    lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
    kept = [line for line in lines if (step := _step_of(line)) is not None and step <= last_step]
    if len(kept) == len(lines) and all(line.endswith("\n") for line in kept):
        return
    replace_through_link(path, "".join(line if line.endswith("\n") else line + "\n" for line in kept).encode())


# ----------------------------------------------------------------------------- sinks


class _Sink(Protocol):
    def write(self, step: int, split: str, metrics: Mapping[str, float]) -> None: ...

    def close(self, status: RunStatus = "completed") -> None: ...


def holds_records(log: Path) -> bool:
    """Whether a log in output_dir (an existing `metrics.jsonl`, `metrics.csv`, `tensorboard/`) holds anything: an
    empty file or directory is no run's. So a log linked before the first run to an empty file or directory on another
    disk is written through, not refused as another run's (`run_dir.check_output_dir`, `claim_log_files`)."""
    return any(log.iterdir()) if log.is_dir() else log.stat().st_size > 0


def claim_log_files(output_dir: str | os.PathLike, report_to: Sequence[str], *, overwrite: bool) -> None:
    """Before a job's fresh run (step 0) opens its local sinks: another run's JSONL, CSV or TensorBoard files of
    ``report_to`` there would hold every step twice. Removes them under ``overwrite`` (a link itself, its target left
    as it is), else refuses, as a trainer refuses such an output_dir (`OutputDirError`), naming the ways out. An
    empty one is no run's (`holds_records`: a log linked to another disk before the first run): it stays."""
    targets, output_dir = parse_report_to(report_to), Path(output_dir)
    found = [name for sink, name in LOG_NAMES.items()
             if sink in targets and (output_dir / name).exists() and holds_records(output_dir / name)]
    if found and not overwrite:
        raise OutputDirError(
            f"job: {str(output_dir)!r} already holds another run's {', '.join(found)}, and this job starts at step "
            "0: its steps would be logged there twice. To continue that run, call `begin(total_steps=..., "
            "initial_step=N)` (the step you restored) before the first log_metric; to start over, pass "
            "overwrite_metrics=True to job(...) (removes them); or choose another output_dir.")
    for name in found:  # a link (logs kept on another disk) is removed itself, never what it leads to
        if (output_dir / name).is_dir() and not (output_dir / name).is_symlink():
            shutil.rmtree(output_dir / name)
        else:
            (output_dir / name).unlink()


class _JsonlSink:
    """Appends one JSON object per ``log`` call, flushed so a crash loses at most one line. NaN and infinities are
    written as the strings "nan", "inf", "-inf" (as in job.json): JSON has no such numbers."""

    def __init__(self, path: Path, initial_step: int):
        if initial_step > 0:
            truncate_jsonl(path, initial_step)
        #: What it wrote, counted from an empty file (None: it found lines there): `linked_logs.take_back`.
        self.written: WrittenLog | None = opened(path) if not path.exists() or not path.stat().st_size else None
        self._file = path.open("a", encoding="utf-8")

    def write(self, step: int, split: str, metrics: Mapping[str, float]) -> None:
        record = {"step": step, "split": split, **strict_json(metrics), "time": time.time()}
        line = json.dumps(record, allow_nan=False) + "\n"
        self._file.write(line)
        self._file.flush()
        if self.written is not None:
            self.written.size += len(line.encode("utf-8"))

    def close(self, status: RunStatus = "completed") -> None:
        self._file.close()


@functools.cache
def _tensorboard_events() -> SimpleNamespace:
    """tensorboardX's synchronous event writer and its protos, imported on first use.

    tensorboardX's package `__init__` tries `import torch` (only to name a type), which costs about 1 s and
    180 MiB where PyTorch is installed; the writer and protos never use it, so unless PyTorch is already
    loaded it is kept out of this import (`sys.modules["torch"] = None` makes `import torch` fail). A run
    that builds a `transformers` config (every language model) still imports PyTorch there, where installed.
    """
    blocked = "torch" not in sys.modules
    if blocked:
        sys.modules["torch"] = None  # type: ignore[assignment]
    try:
        from tensorboardX.event_file_writer import EventsWriter
        from tensorboardX.proto import event_pb2, summary_pb2
    finally:
        if blocked:
            del sys.modules["torch"]
    return SimpleNamespace(EventsWriter=EventsWriter, event_pb2=event_pb2, summary_pb2=summary_pb2)


class _TensorBoardSink:
    """Scalars under ``split/name``, written and flushed synchronously at every log call.

    tensorboardX's ``SummaryWriter`` queues events and flushes every few seconds, so a killed run loses
    steps it had already checkpointed, and it names files by the second, so a restart within the same
    second overwrites the previous file. Its synchronous ``EventsWriter`` avoids both. On resume a
    ``SessionLog.START`` at the first new step tells TensorBoard to drop the killed run's later events.
    """

    def __init__(self, logdir: Path, initial_step: int):
        logdir.mkdir(parents=True, exist_ok=True)
        self._tb = _tensorboard_events()
        suffix = f".{os.getpid()}.{time.time_ns()}"  # this process's own name (`linked_logs.own_event_file`)
        self._writer = self._tb.EventsWriter(str(logdir / "events"), filename_suffix=suffix)
        self.written = opened(next(logdir.glob(f"events.out.tfevents.*{suffix}")), created=True)
        if initial_step > 0:
            session_log = self._tb.event_pb2.SessionLog
            self._write(step=initial_step + 1, session_log=session_log(status=session_log.START))

    def _write(self, **fields: Any) -> None:
        self._writer.write_event(self._tb.event_pb2.Event(wall_time=time.time(), **fields))
        self._writer.flush()

    def write(self, step: int, split: str, metrics: Mapping[str, float]) -> None:
        summary = self._tb.summary_pb2.Summary
        values = [summary.Value(tag=tensorboard_tag(split, name), simple_value=value)
                  for name, value in metrics.items()]
        self._write(step=step, summary=summary(value=values))

    def close(self, status: RunStatus = "completed") -> None:
        self._writer.close()


class _ConsoleSink:
    """A live progress bar on interactive terminals; plain log lines everywhere."""

    def __init__(self, total_steps: int, initial_step: int, show_progress: bool):
        self._console = Console(stderr=True, soft_wrap=True)
        self._total_steps = total_steps
        self._progress: Progress | None = None
        if show_progress and self._console.is_interactive:
            self._progress = Progress(
                TextColumn("{task.description}", markup=False),
                BarColumn(),
                MofNCompleteColumn(),
                TimeElapsedColumn(),
                TimeRemainingColumn(),
                console=self._console,
            )
            self._task = self._progress.add_task("", total=total_steps, completed=initial_step)
            self._progress.start()

    def advance(self, step: int) -> None:
        if self._progress is not None:
            self._progress.update(self._task, completed=step)

    def write(self, step: int, split: str, metrics: Mapping[str, float]) -> None:
        if self._progress is not None and split == "train":
            self._progress.update(self._task, completed=step, description=progress_description(metrics))
        of_total = f"/{self._total_steps}" if self._total_steps > 0 else ""  # 0: a loop that did not say
        line = f"[{split}] step {step}{of_total}  {format_metrics(metrics)}"
        self._console.print(line, markup=False, highlight=False)

    def close(self, status: RunStatus = "completed") -> None:
        if self._progress is not None:
            self._progress.stop()


# ----------------------------------------------------------------------------- reporter


def _as_floats(metrics: Mapping[str, float]) -> dict[str, float]:
    """Plain floats (device scalars and numpy values included) so every sink agrees."""
    return {str(name): float(value) for name, value in metrics.items()}


def open_trackers(output_dir: str | os.PathLike, report_to: Sequence[str], initial_step: int = 0,
                  run_config: Mapping[str, Any] | None = None) -> list[_Sink]:
    """The remote trackers ``report_to`` names (W&B, MLflow), opened on their own: a trainer opens them before
    it claims its output_dir, so one that cannot start (no API key, a store it cannot use) fails the run
    while the previous run's checkpoints are still in place."""
    targets, output_dir = parse_report_to(report_to), Path(output_dir)
    openers = {"wandb": lambda: WandbSink(output_dir, initial_step, run_config),
               "mlflow": lambda: MlflowSink(output_dir, initial_step, run_config)}
    opened: list[_Sink] = []
    try:
        for name, open_tracker in openers.items():
            if name in targets:
                output_dir.mkdir(parents=True, exist_ok=True)
                opened.append(open_tracker())
    except BaseException:
        for tracker in opened:
            tracker.close("failed")
        raise
    return opened


class Reporter:
    """Sends metrics to the console and the sinks ``report_to`` names (TensorBoard, JSONL, CSV, W&B, MLflow).

    Only the main process should report; other processes pass ``enabled=False``
    and the reporter then writes and shows nothing.
    """

    def __init__(
        self,
        *,
        output_dir: str | os.PathLike,
        report_to: Sequence[str] = ("tensorboard", "jsonl"),
        total_steps: int,
        initial_step: int = 0,
        enabled: bool = True,
        show_progress: bool = True,
        run_config: Mapping[str, Any] | None = None,
        trackers: Sequence[_Sink] | None = None,
    ):
        """Opens the requested sinks.

        Args:
            output_dir: Run directory; receives ``tensorboard/``, ``metrics.jsonl``, ``metrics.csv``,
                and the W&B/MLflow run ids.
            report_to: Any of "tensorboard", "jsonl", "csv", "wandb", "mlflow", or just "none".
            total_steps: Last step of the run, for the progress bar.
            initial_step: Step restored from a checkpoint; later entries left by
                the interrupted run are dropped so no step is reported twice.
            enabled: False writes nothing and shows nothing (non-main processes).
            show_progress: Show the live progress bar on interactive terminals.
            run_config: The run's settings, sent to W&B (config) and MLflow (params) when a run starts.
            trackers: The W&B / MLflow sinks, already opened by `open_trackers` (None: opened here).

        Raises:
            ArgumentError: ``report_to`` holds an unknown value, or names a sink that is not installed.
        """
        targets = parse_report_to(report_to)
        self._sinks: list[_Sink] = []
        self._console: _ConsoleSink | None = None
        #: Log name -> what its sink wrote there, kept once closed: a run failing before its first step takes back
        #: that alone where the log is a link (`run_dir.remove_unstarted_logs`).
        self.written_logs: dict[str, WrittenLog] = {}
        if not enabled:
            return
        output_dir = Path(output_dir)
        output_dir.mkdir(parents=True, exist_ok=True)
        openers = {
            "jsonl": lambda: _JsonlSink(output_dir / METRICS_FILENAME, initial_step),
            "csv": lambda: CsvSink(output_dir / CSV_FILENAME, initial_step),
            "tensorboard": lambda: _TensorBoardSink(output_dir / TENSORBOARD_DIRNAME, initial_step),
        }
        try:
            for name in [name for name in openers if name in targets]:
                self._sinks.append(sink := openers[name]())
                if sink.written is not None:
                    self.written_logs[LOG_NAMES[name]] = sink.written
            self._sinks.extend(open_trackers(output_dir, report_to, initial_step, run_config)
                               if trackers is None else trackers)
        except BaseException:
            self.close("failed")  # the sinks already open
            raise
        self._console = _ConsoleSink(total_steps, initial_step, show_progress)
        self._sinks.append(self._console)

    def advance(self, step: int) -> None:
        """Moves the progress bar to ``step``; cheap enough to call every step."""
        if self._console is not None:
            self._console.advance(step)

    def log(self, step: int, metrics: Mapping[str, float], split: str = "train") -> None:
        """Reports ``metrics`` at global ``step`` to every sink.

        Args:
            step: Global optimizer step the metrics belong to.
            metrics: Name to value; values may be Python, numpy or 0-d jax scalars.
            split: "train", "eval", ...; becomes the TensorBoard tag prefix.
        """
        if not self._sinks:
            return
        values = _as_floats(metrics)
        for sink in self._sinks:
            sink.write(int(step), split, values)

    def close(self, status: RunStatus = "completed") -> None:
        """Flushes and closes every sink; safe to call twice.

        Args:
            status: How the run ended, for the trackers that record it (W&B exit code, MLflow run status).
        """
        sinks, self._sinks, self._console = self._sinks, [], None
        for sink in sinks:
            sink.close(status)

    def __enter__(self) -> Reporter:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, *exc_info: object) -> None:
        self.close("completed" if exc_type is None else "failed")
