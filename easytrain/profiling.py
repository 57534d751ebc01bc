"""A `jax.profiler` trace of chosen training steps (`profile_steps` from `profile_start_step`).

The trace covers whole steps as the loop runs them: the batch read, its upload, the dispatch, and the device work
(the loop waits for the last traced step before the trace stops). Each step is marked with a
`jax.profiler.StepTraceAnnotation` named "train" and its step number, which TensorBoard's profile tab uses to split
the trace into steps. It is written where TensorBoard finds it beside the run's metrics,
`output_dir/tensorboard/plugins/profile/<time>/`, with a `perfetto_trace.json.gz` that opens in
https://ui.perfetto.dev without TensorBoard. Over several processes each writes its own, under
`tensorboard/process_<index>/`: processes on one host would otherwise write files of the same name.

Steps are counted as the loop counts them (the first update is step 1; step 1 compiles the train step). A run
resumed inside the window traces the rest of it; one resumed past it traces nothing. A fresh run that fails before its
first step takes back the trace it wrote through a linked `tensorboard/` with its event file (`StepProfiler.take_back`).
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import socket
from pathlib import Path
from typing import Any, ContextManager

import jax

from easytrain.errors import ArgumentError

logger = logging.getLogger("easytrain")
STEP_NAME = "train"
#: The Perfetto file jax writes beside a trace (`create_perfetto_trace`), under no host name.
PERFETTO_FILE = "perfetto_trace.json.gz"


def trace_dir(output_dir: str | Path, process_index: int, process_count: int) -> Path:
    """Where this process writes its trace: TensorBoard's log directory of the run (one per process if several)."""
    root = Path(output_dir) / "tensorboard"
    return root if process_count == 1 else root / f"process_{process_index}"


def trace_runs(directory: Path) -> set[str]:
    """The traces under `directory` (`plugins/profile/<time>/`, one per `start_trace`), by name."""
    runs = directory / "plugins" / "profile"
    return {entry.name for entry in runs.iterdir()} if runs.is_dir() else set()


def own_trace(directory: Path, appeared: set[str]) -> list[Path]:
    """The folder this process's stop wrote, of the trace folders that `appeared` under `directory` meanwhile: none
    where several did (another run traced into a shared `tensorboard/` meanwhile; which is whose cannot be told)."""
    if len(appeared) != 1:
        if appeared:
            logger.info("profile_steps: several traces appeared in %s while this one was written (%s): none is taken "
                        "back if the run fails", directory, ", ".join(sorted(appeared)))
        return []
    return [directory / "plugins" / "profile" / appeared.pop()]


def take_back_files(trace: Path) -> None:
    """Remove this host's files of `trace` (jax names them `<hostname>.*`), and the folder with its Perfetto file
    where nothing else is in it: another run's trace stopped in the same second (jax names the folder by the time)
    writes into the same folder, and its files stay."""
    ours = f"{socket.gethostname()}."
    files = list(trace.iterdir()) if trace.is_dir() else []
    if all(file.name.startswith(ours) or file.name == PERFETTO_FILE for file in files):
        shutil.rmtree(trace, ignore_errors=True)
        return
    for file in files:
        if file.name.startswith(ours) and file.is_file():
            file.unlink(missing_ok=True)


def check_window(args: Any, total_steps: int) -> None:
    """Refuses a window (`args.profile_start_step`, `args.profile_steps`) that would trace nothing because the run
    ends before it: before any compute."""
    if args.profile_steps and args.profile_start_step > total_steps:
        raise ArgumentError("profile_start_step", f"is {args.profile_start_step}, past the run's last step "
                                                  f"({total_steps}), so no step would be traced; choose a step in "
                                                  f"[1, {total_steps}], or set profile_steps to 0.")


class StepProfiler:
    """Starts and stops one trace around steps `first` to `first + count - 1`; inactive when `count` is 0."""

    def __init__(self, directory: Path, first: int, count: int):
        self.directory, self.first, self.last = directory, first, first + count - 1
        self.tracing = False
        self.done = count == 0
        self.traced: list[int] = []
        #: What the trace added under `directory`, for `take_back`: its folder, and the empty folders above it that
        #: were not there before (`plugins/profile/`, ...), deepest first.
        self.written: list[Path] = []
        self._made: list[Path] = []

    def before_step(self, step: int) -> None:
        """Called before step `step` reads its batch: start the trace at the window's first step, or at the first
        step inside it after a resume."""
        if self.done or self.tracing or not self.first <= step <= self.last:
            return
        try:
            jax.profiler.start_trace(self.directory, create_perfetto_trace=True)
        except RuntimeError as error:  # another trace is running in this process (the user's own)
            logger.warning("profile_steps: not tracing steps %d-%d, jax.profiler refused to start (%s)", step,
                           self.last, error)
            self.done = True
            return
        self.tracing = True

    def annotate(self, step: int) -> ContextManager[Any]:
        """Marks step `step` in the trace (nothing outside the window)."""
        if not self.tracing:
            return contextlib.nullcontext()
        self.traced.append(step)
        return jax.profiler.StepTraceAnnotation(STEP_NAME, step_num=step)

    def ends_at(self, step: int) -> bool:
        """Whether the trace stops after step `step` (the window's last step)."""
        return self.tracing and step >= self.last

    def stop(self) -> None:
        """Stops and writes the trace, if one is running (also when a run ends or fails inside the window).

        The caller waits for the device first, so the traced steps' device work is in it. A trace that cannot be
        written (a full disk) is logged, not raised: it is a diagnostic, and the run goes on."""
        if not self.tracing:
            return
        self.tracing, self.done = False, True
        steps = f"{self.traced[0]}-{self.traced[-1]}" if self.traced else "none"
        found = trace_runs(self.directory)  # the trace's folder is made as it is written, at the stop
        self._made = [folder for folder in (self.directory / "plugins" / "profile", self.directory / "plugins",
                                            self.directory) if not folder.exists()]
        try:
            jax.profiler.stop_trace()
        except Exception:
            logger.exception("profile_steps: the trace of steps %s could not be written to %s", steps, self.directory)
            return
        finally:  # what it wrote, even in part
            self.written = own_trace(self.directory, trace_runs(self.directory) - found)
        logger.info("profile of steps %s written to %s (tensorboard --logdir %s, or its perfetto_trace.json.gz at "
                    "https://ui.perfetto.dev)", steps, self.directory / "plugins" / "profile", self.directory)

    def take_back(self) -> None:
        """Remove the trace this run wrote and the empty folders it made for it, nothing else: a fresh run that failed
        before its first step, in a `tensorboard/` linked to a folder others may write to (`run_dir.
        remove_unstarted_logs` removes a plain one whole), leaves it as it found it, like its event file."""
        for trace in self.written:
            take_back_files(trace)
        for folder in self._made:
            with contextlib.suppress(OSError):  # not empty: another wrote there meanwhile
                os.rmdir(folder)
        self.written, self._made = [], []
