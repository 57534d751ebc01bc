"""One training run at a time per output_dir: an exclusive `flock` on `output_dir/.easytrain.lock`.

Two runs started together in one directory both passed its checks (it was empty) and then wrote into it side
by side: interleaved metrics, and one run's checkpoints silently replaced by the other's. The lock is taken
right before a run first changes the directory (`claim.claim_run`, main process only) and released when
`train()` returns. The kernel drops it with the process, so a run killed with SIGKILL leaves nothing stale
behind for the resumed run to trip over. Where the file system has no `flock` (some network mounts), the run
goes on unlocked, with a warning.
"""

from __future__ import annotations

import fcntl
import logging
import os
import socket
from pathlib import Path
from typing import IO

from easytrain.errors import OutputDirError

LOCK_FILENAME = ".easytrain.lock"

logger = logging.getLogger("easytrain")
_held: dict[Path, IO[str]] = {}


def acquire(output_dir: str | os.PathLike) -> None:
    """Hold `output_dir`'s lock for this process (again, if it already does).

    Raises:
        OutputDirError: another process trains in `output_dir`; the message names it.
    """
    directory = Path(output_dir).resolve()
    if directory in _held:
        return
    directory.mkdir(parents=True, exist_ok=True)
    handle = open(directory / LOCK_FILENAME, "a+")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        error = _in_use(directory, handle)
        handle.close()
        raise error from None
    except OSError as error:  # no flock on this file system
        logger.warning("output_dir %s cannot be locked (%s): nothing stops a second run from writing into it at the "
                       "same time", directory, error.strerror)
        handle.close()
        return
    handle.seek(0)
    handle.truncate()
    handle.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
    handle.flush()
    _held[directory] = handle


def refuse_if_held(output_dir: str | os.PathLike) -> None:
    """Refuse at once, writing nothing, if another live process holds `output_dir`'s lock: a second start of a
    running run's command (a resubmitted or requeued job) must not touch that run's files (its `job.json`, its
    checkpoints being written) before `acquire` would refuse it. A probe: the lock is not kept.

    Raises:
        OutputDirError: another process trains in `output_dir`, as `acquire` raises it.
    """
    directory = Path(output_dir).resolve()
    if directory in _held:
        return
    try:
        handle = open(directory / LOCK_FILENAME)  # read only: creates nothing (no lock file, no run yet)
    except OSError:
        return
    with handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            raise _in_use(directory, handle) from None
        except OSError:  # no flock on this file system: `acquire` warns
            return
        fcntl.flock(handle, fcntl.LOCK_UN)


def _in_use(directory: Path, handle: IO[str]) -> OutputDirError:
    handle.seek(0)
    holder = handle.read().strip() or "another process"
    return OutputDirError(f"output_dir: {str(directory)!r} is in use by a run that is still training ({holder} "
                          f"holds {LOCK_FILENAME}); wait for it to end, or choose another --output_dir.")


def release(output_dir: str | os.PathLike) -> None:
    """Let another run into `output_dir` (a no-op where this process holds no lock on it)."""
    handle = _held.pop(Path(output_dir).resolve(), None)
    if handle is not None:
        handle.seek(0)
        handle.truncate()  # no holder named in a lock nobody holds
        fcntl.flock(handle, fcntl.LOCK_UN)
        handle.close()
