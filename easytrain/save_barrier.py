"""A checkpoint save of a multi-process run that fails on one process ends every process within seconds.

Orbax completes a save in the background: each process writes its part, then all meet at barriers before the primary
process commits the checkpoint. A process whose write failed (a full disk) never reaches the first barrier, and waits
at the next one (the end of the save) for the others: each side waits Orbax's whole timeout (`AsyncOptions.
timeout_secs`, 20 minutes) before any error is raised.

So a process whose part of a save failed publishes it at once (`publish_failed_write`, also through
`process_failure`, so the others name it), from the writer that failed (`report_write_failures`) or from the save
that raised; and Orbax's background barriers are `barrier`: the same barrier (each process sets its key in the
coordination service's key-value store, then waits for the others'), which also gives up as soon as another process
published that its part of the save failed (`SaveAbandonedError`): the save can never complete then, and the newest
complete checkpoint is left as it is. A process that vanished without a word is still waited for up to Orbax's
timeout; a process's own failed write never ends its wait: the others still come to the end of the save.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

import jax

from easytrain.save_failures import SaveAbandonedError

#: Where process `i` says its part of a save failed in the `r`-th `train()` of the job: `f"{FAILED_WRITE_KEY}{r}/{i}"`.
FAILED_WRITE_KEY = "easytrain/failed_write/"
#: Where process `i` says it reached the `n`-th call of barrier `key` in run `r`: `f"{BARRIER_KEY}{r}/{key}/{n}/{i}"`.
BARRIER_KEY = "easytrain/save_barrier/"
#: How long one wait for another process's key lasts before the published write failures are looked at again.
POLL_SECONDS = 0.5

_lock = threading.Lock()
#: Calls of each barrier key in each run (Orbax calls some keys at every save): every process counts alike.
_calls: dict[tuple[int, str], int] = {}
#: This process's keys of the barriers passed: every process has read them once a later barrier is passed.
_passed: list[str] = []


def _failures() -> Any:
    """`easytrain.trainers.process_failure`, imported when first needed (the trainers import `checkpoint`)."""
    from easytrain.trainers import process_failure

    return process_failure


def publish_failed_write(error: BaseException) -> None:
    """Say (once a run) that this process's part of a save failed with `error`: the others' `barrier` gives up."""
    process_failure = _failures()
    if (client := process_failure.coordination_client()) is None:
        return
    process_failure.publish_failure(error)
    key = f"{FAILED_WRITE_KEY}{process_failure.run_number()}/{jax.process_index()}"
    process_failure.bounded(lambda: client.key_value_set(key, process_failure.describe(error), allow_overwrite=True))


def failed_writes(client: Any, own_index: int) -> dict[int, str]:
    """`{process index: line about its error}` of the other processes whose part of a save of this run failed."""
    process_failure = _failures()
    entries = process_failure.bounded(
        lambda: client.key_value_dir_get(f"{FAILED_WRITE_KEY}{process_failure.run_number()}/"))
    found = {}
    for key, value in entries or ():
        index = str(key).rstrip("/").rsplit("/", 1)[-1]
        if index.isdigit() and int(index) != own_index:
            found[int(index)] = str(value)
    return found


def barrier(*, key: str, timeout_ms: int) -> None:
    """Orbax's `BarrierSyncFn`: return once every process called it with `key` (as often), or raise
    `SaveAbandonedError` once another process published a failed write, `TimeoutError` after `timeout_ms`."""
    process_failure = _failures()
    if (client := process_failure.coordination_client()) is None:
        return
    own, run = jax.process_index(), process_failure.run_number()
    with _lock:
        count = _calls[(run, key)] = _calls.get((run, key), 0) + 1
    base = f"{BARRIER_KEY}{run}/{key}/{count}/"
    client.key_value_set(f"{base}{own}", "1", allow_overwrite=True)
    deadline = time.monotonic() + timeout_ms / 1000
    for other in range(jax.process_count()):
        while other != own and not _arrived(client, f"{base}{other}"):
            if failed := failed_writes(client, own):  # its error is named by `process_failure`, once
                raise SaveAbandonedError(f"process {min(failed)} could not write its part of the checkpoint: this "
                                         f"process stopped waiting for it at Orbax's barrier {key!r}")
            if time.monotonic() >= deadline:
                raise TimeoutError(f"Timed out after {timeout_ms / 1000:g} s waiting for process {other} at Orbax's "
                                   f"barrier {key!r}")
    _forget_passed(client, f"{base}{own}")


def _arrived(client: Any, key: str) -> bool:
    """Whether `key` is set, waiting up to `POLL_SECONDS` for it (never returning sooner while it is not)."""
    started = time.monotonic()
    try:
        client.blocking_key_value_get(key, int(POLL_SECONDS * 1000))
        return True
    except Exception:  # noqa: BLE001 - not set yet (or no answer: wait as long as a poll would)
        time.sleep(max(0.0, POLL_SECONDS - (time.monotonic() - started)))
        return False


def _forget_passed(client: Any, key: str) -> None:
    """Delete this process's keys of the barriers passed before `key`'s: the store keeps one per process."""
    with _lock:
        old, _passed[:] = list(_passed), [key]
    for each in old:
        _failures().bounded(lambda each=each: client.key_value_delete(each))


def report_write_failures(handler: Any, report: Callable[[BaseException], None]) -> Any:
    """`handler` (an Orbax `AsyncCheckpointHandler`) with `report(error)` called where one of its writes fails: in
    its `async_save` or, in the background, in the commit futures it returned. Errors still propagate as before."""
    save = handler.async_save

    async def async_save(*args: Any, **kwargs: Any) -> Any:
        try:
            futures = await save(*args, **kwargs)
        except Exception as error:
            report(error)
            raise
        return None if futures is None else [_Reported(each, report) for each in futures]

    handler.async_save = async_save
    return handler


class _Reported:
    """An Orbax commit future whose failure is reported (`report_write_failures`) before it is raised."""

    def __init__(self, inner: Any, report: Callable[[BaseException], None]):
        self._inner, self._report = inner, report

    def result(self, timeout: float | None = None) -> Any:
        try:
            return self._inner.result(timeout=timeout)
        except Exception as error:
            self._report(error)
            raise

    def cancel(self) -> Any:
        return self._inner.cancel()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)
