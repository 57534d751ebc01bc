"""Orbax runs each read and write of a checkpoint on an event loop of its own, which it closes as soon as the run
fails, with the run's other tasks still waiting on TensorStore. Each of those calls back into the closed loop once
its read completes, and Python prints a `RuntimeError: Event loop is closed` traceback for every one: dozens of
them ahead of the one error that matters (a refused, damaged checkpoint; a full disk).

`end_leftover_tasks` makes a failed run let its other tasks end before the loop is closed (`asyncio.run` cancels
them; cancelled, TensorStore may still call back): none is left to call back. A run that succeeds is unchanged.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Coroutine
from typing import Any, TypeVar

_T = TypeVar("_T")
#: How long a failed run's other tasks may take to complete before they are cancelled: reads and writes of a local
#: disk end in far less; a cancelled one may still call back into the closed loop (TensorStore's race).
LEFTOVER_WAIT_SECONDS = 10.0
_installed = False
_lock = threading.Lock()


def run_ending_leftovers(coro: Coroutine[Any, Any, _T]) -> _T:
    """Orbax's `_run_sync_via_new_loop` (a fresh loop, run until `coro` completes, closed), except that when `coro`
    fails, the loop's other tasks are ended (`end_pending`) before the loop closes."""
    loop = asyncio.new_event_loop()
    try:
        asyncio.set_event_loop(loop)
        try:
            return loop.run_until_complete(coro)
        except BaseException:
            end_pending(loop)
            raise
    finally:
        asyncio.set_event_loop(None)
        loop.close()


def end_pending(loop: asyncio.AbstractEventLoop, timeout: float = LEFTOVER_WAIT_SECONDS) -> None:
    """Let the tasks still pending on `loop` complete (their TensorStore callbacks then all reach the open loop), for
    at most `timeout` s; cancel those still running then (one waiting on other processes, say). Their errors are
    the failed run's echoes: retrieved, not reported."""
    if not (pending := [task for task in asyncio.all_tasks(loop) if not task.done()]):
        return
    ended = asyncio.gather(*pending, return_exceptions=True)
    loop.run_until_complete(asyncio.wait([ended], timeout=timeout))
    if not ended.done():
        ended.cancel()
        try:
            loop.run_until_complete(ended)
        except asyncio.CancelledError:
            pass


def end_leftover_tasks() -> None:
    """Make Orbax's synchronous runs `run_ending_leftovers` (once per process). An Orbax without that function
    (another version) is left as it is: only its tracebacks on failures would come back."""
    global _installed
    with _lock:
        if _installed:
            return
        from orbax.checkpoint._src import asyncio_utils

        if callable(getattr(asyncio_utils, "_run_sync_via_new_loop", None)):
            asyncio_utils._run_sync_via_new_loop = run_ending_leftovers
        _installed = True
