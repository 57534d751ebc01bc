"""Give the host memory a checkpoint leaves behind back to the system (glibc's `malloc_trim`).

A save copies the state into host buffers, on orbax's and tensorstore's threads when it is asynchronous, while
XLA's threads run the next steps. glibc serves each thread from an arena of its own and returns an arena's free
memory to the system only from its top, so most of what a save frees stays in the process, fragmented between
blocks still in use. Training the benchmark Llama (75 MB of state) with a save every 25 steps, the process's
resident memory rose by 420 MiB over nine asynchronous saves and by 100 MiB over nine synchronous ones, while it
stayed flat without saves; `malloc_trim(0)`, which hands every arena's free pages back, kept it flat with them
(docs/benchmarks.md, "Long runs"). So the training loop trims once after each save is complete (`TrimAfterSaves`),
at a log, where the host waits on nothing. Elsewhere than glibc (musl, macOS) nothing is done.
"""

from __future__ import annotations

import ctypes
import functools
import logging
import os
import time
from typing import Callable

logger = logging.getLogger("easytrain")


@functools.cache
def _glibc() -> ctypes.CDLL | None:
    """The C library when it is glibc (the only one with `malloc_trim`), else None."""
    try:
        if not (os.confstr("CS_GNU_LIBC_VERSION") or "").startswith("glibc"):
            return None
    except (AttributeError, ValueError, OSError):
        return None
    library = ctypes.CDLL(None)  # the symbols already loaded, glibc's among them: no search for the library
    library.malloc_trim.argtypes, library.malloc_trim.restype = [ctypes.c_size_t], ctypes.c_int
    return library


def release_free_memory() -> bool:
    """Return the free pages of every glibc arena to the system; False, with nothing done, without glibc."""
    library = _glibc()
    if library is None:
        return False
    started = time.perf_counter()
    library.malloc_trim(0)
    logger.debug("returned free heap memory to the system in %.1f ms", 1e3 * (time.perf_counter() - started))
    return True


class TrimAfterSaves:
    """Trims the heap once after each save (or run of saves) is complete: `saved()` when one starts, `check()`
    at every log and when the loop ends, with whether a save is still being written."""

    def __init__(self, trim: Callable[[], object] | None = None):
        self.trim = trim or release_free_memory
        self.pending = False

    def saved(self) -> None:
        self.pending = True

    def check(self, saving: bool) -> None:
        if self.pending and not saving:
            self.trim()
            self.pending = False
