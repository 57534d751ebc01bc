"""What a checkpoint save that failed tells the user: one `CheckpointWriteError` naming the step whose save failed,
its cause (a full disk said plainly), the newest complete checkpoint, which is intact, and how to resume from it.

Orbax reports the same failure on its own logger from each of its writer threads, a traceback each; those reports of
a full disk are dropped while a writing `CheckpointManager` is open (the error raised says it once). Other failures
keep Orbax's reports: their tracebacks are what a bug report needs.
"""

from __future__ import annotations

import errno
import logging
import shutil
import threading
import time
from collections.abc import Iterator
from pathlib import Path

from easytrain.errors import CheckpointWriteError

#: What a full disk (or a full quota) reads as: an OSError's errno, or the text TensorStore puts in its
#: RESOURCE_EXHAUSTED status (a cloud bucket's rate limit is RESOURCE_EXHAUSTED too, and is no full disk).
DISK_FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT})
DISK_FULL_TEXTS = ("No space left on device", "Disk quota exceeded", "os_error_code='28'")
#: The longest cause quoted: TensorStore's statuses name every file of the write.
MAX_CAUSE_CHARS = 400


def chain(error: BaseException) -> Iterator[BaseException]:
    """`error` and the exceptions it was raised from or while handling, outermost first."""
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        yield current
        current = current.__cause__ or current.__context__


def is_disk_full(error: BaseException) -> bool:
    """Whether `error` (or one in its chain) is a write that found no space left (`DISK_FULL_ERRNOS`, `_TEXTS`)."""
    return any((isinstance(each, OSError) and each.errno in DISK_FULL_ERRNOS)
               or any(text in str(each) for text in DISK_FULL_TEXTS) for each in chain(error))


#: TensorStore statuses of a write that failed on the storage (not of a barrier or a peer).
WRITE_STATUSES = ("RESOURCE_EXHAUSTED", "PERMISSION_DENIED", "Error writing", "Failed writing", "Failed to write")


class SaveAbandonedError(RuntimeError):
    """This process stopped waiting for a save another process could not write its part of (`save_barrier`): no
    failure of this process's storage; its message names that process (`process_failure` quotes its error)."""


def refused_write(error: BaseException) -> bool:
    """Whether `error` itself (not its chain) is the storage refusing a write: an `OSError` (but no `TimeoutError`,
    which Orbax raises for a barrier given up on, nor a `SaveAbandonedError`), a TensorStore write status."""
    if isinstance(error, (TimeoutError, SaveAbandonedError)):
        return False
    return isinstance(error, OSError) or any(status in str(error) for status in WRITE_STATUSES)


def is_write_failure(error: BaseException) -> bool:
    """Whether `error` (or one in its chain) is the storage refusing a write (`refused_write`), which
    `CheckpointWriteError` explains; anything else (a barrier given up on a process that failed, a bug) passes
    through as it is, so `process_failure` can still name the process that failed first."""
    return any(refused_write(each) for each in chain(error))


def cause(error: BaseException) -> str:
    """`Type: first line` of `error`, shortened to `MAX_CAUSE_CHARS`."""
    text = str(error).strip()
    line = text.splitlines()[0] if text else ""
    line = line if len(line) <= MAX_CAUSE_CHARS else line[:MAX_CAUSE_CHARS] + " ..."
    return f"{type(error).__name__}: {line}" if line else type(error).__name__


def write_error(directory: Path, step: int | None, latest: int | None, error: BaseException,
                removed_partial: bool) -> CheckpointWriteError:
    """The error a failed save of `step` into `directory` is raised as; `latest` is the newest complete checkpoint
    there (None: none yet), `removed_partial` whether the save's half-written files were removed."""
    full = is_disk_full(error)
    error = next((each for each in chain(error) if refused_write(each)), error)  # not a barrier given up after it
    which = f"the checkpoint of step {step}" if step is not None else "a checkpoint"
    what = f"{which} could not be written{': the disk is full' if full else ''} ({cause(error)})."
    if latest is None:
        kept = " No complete checkpoint was written yet: the resume below starts the run over from step 0."
    else:
        kept = (" The checkpoints before it are untouched: the newest complete checkpoint, "
                f"{directory / str(latest)}, is intact.")
    partial = f" The failed save's partial files were removed from {directory}." if removed_partial else ""
    first = f"Free space on the disk of {directory}" if full else "Fix the cause"
    if directory.name == "checkpoints":
        resume = (f"rerun the same command with --resume_from_checkpoint latest added, or run: easytrain train "
                  f"--config {directory.parent}/arguments.json")
    else:
        resume = f"resume with resume_from_checkpoint={str(directory)!r}"
    return CheckpointWriteError(f"{what}{kept}{partial} {first}, then {resume}.", step=step, latest=latest)


def remove_partial(directory: Path, step: int) -> bool:
    """Remove the half-written `<step>.orbax-checkpoint-tmp` directory a failed save left (on a full disk it holds
    the space the run's last records need). Only for the single process of the run that owns `directory`: no one
    else writes it. Returns whether one was removed."""
    partial = [path for path in directory.glob(f"{step}.orbax-checkpoint-tmp*") if path.is_dir()]
    for path in partial:
        shutil.rmtree(path, ignore_errors=True)
    return bool(partial)


def let_writers_end(running: set[threading.Thread] | None = None, timeout: float = 60.0) -> None:
    """A save whose one writer failed (a full disk) leaves its other writer threads running: wait for them (at most
    `timeout` s in all), or they fail at interpreter exit with screens of 'cannot schedule new futures after
    interpreter shutdown' behind the real error. `running`: the threads before a synchronous save (every thread
    started since is its); None: Orbax's own writer threads, wherever they were started."""
    deadline = time.monotonic() + timeout
    for thread in threading.enumerate():
        if thread.daemon or thread is threading.current_thread():
            continue
        if (thread not in running) if running is not None else type(thread).__module__.startswith("orbax."):
            thread.join(max(0.0, deadline - time.monotonic()))


class _DiskFullReports(logging.Filter):
    """Drops Orbax's reports (with tracebacks) of a write that found the disk full, and of a save given up for
    another process's failed write: the save raises it once."""

    def filter(self, record: logging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else None
        return not (error is not None and "orbax" in record.pathname and
                    (is_disk_full(error) or any(isinstance(each, SaveAbandonedError) for each in chain(error))))


_REPORTS = _DiskFullReports()
_open_writers = 0
_lock = threading.Lock()


def quiet_disk_full_reports(on: bool) -> None:
    """Count a writing manager opened (`on`) or closed; Orbax's full-disk reports are dropped while one is open."""
    global _open_writers
    with _lock:
        _open_writers = max(0, _open_writers + (1 if on else -1))
        if _open_writers:
            logging.getLogger("absl").addFilter(_REPORTS)  # a no-op when there already
        else:
            logging.getLogger("absl").removeFilter(_REPORTS)
