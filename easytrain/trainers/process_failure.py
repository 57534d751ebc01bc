"""A failure on one process of a multi-process run, named on every process.

When one process fails inside `train()` (its set-up: a data file missing on its host, a checkpoint it cannot
restore; or its steps: a bad batch, a bug in a callback), the others are left inside a set-up gather or a step's
collective, which fails only at the collective's deadline (about 30 s for Gloo on CPU, longer for NCCL) with an
error that names nothing (`GetKeyValue() timed out`), or, once the step's collectives are set up, wait in them
for many minutes. So a failing process publishes one line about its error in the coordination service's
key-value store, and:

- while a `train()` runs (`running`: its set-up, building the model, preparing the data, restoring a checkpoint,
  and its steps; `watching`: the steps alone), every process watches for such a line (one thread, one long-polled
  key, no device work) and logs it within seconds, even if it then waits in a collective that will never complete;
- a process that then makes no progress for `EXIT_AFTER_SECONDS` (`SAVE_EXIT_AFTER_SECONDS` while a checkpoint save
  is being written; most often blocked in a collective that cannot
  complete without the failed process: Gloo and NCCL wait there, and JAX ends it only when the failed process's
  exit barrier times out, `shutdown_timeout_seconds`, 5 minutes by default, with an abort that leaves job.json
  "running") ends itself: job.json says "failed" with an `OtherProcessFailedError` naming the other's error, and the
  process exits with `EXIT_CODE` (`end_process`). A process that has failed itself (it published its own failure:
  every process may stop with the same error at the same step) is never ended so: its own failure handling runs
  to its end, naming the others;
- a process that fails afterwards looks the lines up and raises `OtherProcessFailedError` naming the ones published
  before its own, its own error chained; with none earlier (it failed first) it raises its own error and warns
  of the later ones (a process whose own error is an `EasytrainError`, which names its cause, raises it and warns
  of the others').

The order is that of the published unix times: processes on different hosts compare their clocks, so two failures
closer together than the hosts' clock difference may be named in either order.

Everything here is best effort and bounded in time: it never hides the process's own error. A single-process
run does nothing here.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from typing import Any, TypeVar

import jax

from easytrain.errors import EasytrainError
from easytrain.active_job import current_job
from easytrain.jobs import outcome_of

logger = logging.getLogger("easytrain")
T = TypeVar("T")

#: Where process `i` publishes its failure in the `r`-th `train()` of the job: `f"{KEY_PREFIX}{r}/{i}"`; the
#: first process to fail in it also sets `f"{FIRST_KEY}{r}"`, the key `watching` waits on.
KEY_PREFIX = "easytrain/failed/"
FIRST_KEY = "easytrain/first_failure/"
#: How long one wait of the watcher lasts: a `train()` that ends waits up to this for the watcher to stop.
WATCH_POLL_SECONDS = 0.5
#: How long the watcher holds back another process's failure: a failure every process meets at about the same step
#: (a non-finite stop, a refused save) ends this process's steps too, and its own error is the one to show then.
WATCH_GRACE_SECONDS = 5.0
#: How long a failing process waits for the others' lines (a process that failed at about the same time may
#: publish just after this one looks), and the bound on any one call to the coordination service.
LOOKUP_SECONDS = 2.0
POLL_SECONDS = 0.2
#: How long a process waits without progress (no new batch drawn, no save starting or ending) once another process's
#: failure is logged, before it ends itself (`end_process`): a step, an evaluation, a log take far less.
EXIT_AFTER_SECONDS = 60.0
#: The same while a checkpoint save is being written (`watching`'s `saving()`), which shows no progress until it ends
#: (a 7B model's save to network storage takes minutes). A save that needs the failed process never ends by itself
#: before Orbax gives up on it (`AsyncOptions.timeout_secs`, 20 minutes, then it fails the run): this bound is longer.
SAVE_EXIT_AFTER_SECONDS = 25 * 60.0
#: The exit status it ends with: that of `easytrain train` for a run that failed (`cli.FAILED_EXIT_CODE`).
EXIT_CODE = 1
#: How ending the process replaces it (`os._exit`: see `end_process`); tests replace it.
exit_process: Callable[[int], Any] = os._exit
#: A published line is cut to this length (a data error's message with its fix fits).
MAX_LINE = 2000
#: What `end_process` does before it ends the process (`before_ending`): the older run in output_dir given back.
_before_ending: list[Callable[[], Any]] = []
#: `train()` calls this process has made in a multi-process run: every process makes the same calls, so the count
#: names one run on all of them, and a failure caught in an earlier `train()` of the same job is not this one's.
_runs = 0
#: `{(run, process index): unix time}` of the failures `publish` published from this process: the time a failure
#: of this process is compared with, to tell the others' earlier failures (named) from later ones (warned of).
_published: dict[tuple[int, int], float] = {}
#: The `(progress, saving)` signals of the `train()` being watched (`running`'s, which a `watching` inside it joins),
#: or None.
_progress: list[tuple[Callable[[], Any], Callable[[], Any]]] | None = None


class OtherProcessFailedError(EasytrainError, RuntimeError):
    """Another process of the run failed first; this process's own error (most often a collective's timeout,
    which names nothing) is its `__cause__`."""


def describe(error: BaseException) -> str:
    """One line about `error`: its type and message, newlines folded, cut to `MAX_LINE`."""
    message = " ".join(str(error).split())
    line = f"{type(error).__name__}: {message}" if message else type(error).__name__
    return line if len(line) <= MAX_LINE else line[:MAX_LINE - 3] + "..."


def coordination_client() -> Any | None:
    """The `jax.distributed` client of a multi-process run, or None (a single process, or none reachable)."""
    if jax.process_count() <= 1:
        return None
    try:
        from jax._src import distributed

        return distributed.global_state.client
    except (ImportError, AttributeError):  # another jax: the run fails as it would without this module
        return None


def bounded(call: Callable[[], T], seconds: float = LOOKUP_SECONDS) -> T | None:
    """`call()` in a daemon thread, given up after `seconds` (None then, or if it raised): the service may be gone
    with the process that hosted it, and a failing process must not hang on it."""
    result: list[T] = []

    def target() -> None:
        try:
            result.append(call())
        except Exception:  # noqa: BLE001 - best effort: the run's own error is the one that matters
            logger.debug("the coordination service did not answer", exc_info=True)

    thread = threading.Thread(target=target, name="easytrain-process-failure", daemon=True)
    thread.start()
    thread.join(seconds)
    return result[0] if result else None


def publish(client: Any, process_index: int, error: BaseException, now: float | None = None) -> float:
    """Put `<unix time> <one line about error>` under this process's key (the time orders the failures), and
    `<index> <unix time> <line>` under the first-failure key unless another process set it first. Returns the
    published time, also kept in `_published` for `reraise_naming_others`."""
    # In milliseconds, rounded down (never after the failure), kept as the others parse it: equal times compare equal.
    stamp = f"{math.floor((time.time() if now is None else now) * 1000) / 1000:.3f}"
    _published[(_runs, process_index)] = float(stamp)
    value = f"{stamp} {describe(error)}"
    bounded(lambda: client.key_value_set(f"{KEY_PREFIX}{_runs}/{process_index}", value, allow_overwrite=True))
    bounded(lambda: client.key_value_set(f"{FIRST_KEY}{_runs}", f"{process_index} {value}"))
    return float(stamp)


def parse(entries: Any, own_index: int) -> dict[int, tuple[float, str]]:
    """`{process index: (time, line)}` of the other processes from `key_value_dir_get(KEY_PREFIX)`'s `(key, value)`
    pairs (keys with or without the prefix, whatever the service returns); a value without a time sorts first."""
    found: dict[int, tuple[float, str]] = {}
    for key, value in entries or ():
        index = str(key).rstrip("/").rsplit("/", 1)[-1]
        if index.isdigit() and int(index) != own_index:
            stamp, _, line = str(value).partition(" ")
            try:
                found[int(index)] = (float(stamp), line)
            except ValueError:
                found[int(index)] = (0.0, str(value))
    return found


def others_failures(client: Any, own_index: int, wait_seconds: float = LOOKUP_SECONDS,
                    before: float | None = None) -> dict[int, tuple[float, str]]:
    """What the other processes published, waiting up to `wait_seconds` for a first line (with `before`, for a
    first line published before that time: a later one never changes which error is raised)."""
    deadline = time.monotonic() + wait_seconds
    while True:
        found = parse(bounded(lambda: client.key_value_dir_get(f"{KEY_PREFIX}{_runs}/")), own_index)
        wanted = found if before is None else earlier(found, own_index, before)
        if wanted or time.monotonic() >= deadline:
            return found
        time.sleep(POLL_SECONDS)


def earlier(others: Mapping[int, tuple[float, str]], own_index: int,
            own_time: float) -> dict[int, tuple[float, str]]:
    """The failures of `others` published before this process's own at `own_time` (at the same time, those of
    lower process indices), so that of two processes exactly one names the other."""
    return {index: failure for index, failure in others.items() if (failure[0], index) < (own_time, own_index)}


def naming_error(own: BaseException, own_index: int,
                 others: Mapping[int, tuple[float, str]]) -> OtherProcessFailedError:
    """The error that names the processes that failed (the first to fail first), then this process's own."""
    ordered = sorted(others.items(), key=lambda item: (item[1][0], item[0]))
    named = "; ".join(f"process {index} failed: {line.removesuffix('.')}" for index, (_, line) in ordered)
    return OtherProcessFailedError(f"{named}. This process ({own_index}) failed after it: {describe(own)}")


def warn_of_later(own_index: int, later: Mapping[int, tuple[float, str]]) -> None:
    """Log the failures other processes published after this process's own (most often caused by it)."""
    for index, (_, line) in sorted(later.items(), key=lambda item: (item[1][0], item[0])):
        logger.warning("process %d failed too, after this process (%d): %s", index, own_index, line)


@contextlib.contextmanager
def running() -> Iterator[None]:
    """Around a whole multi-process `train()`, set-up included: watch (as `watching` does) from its start, and
    publish a failure the steps did not handle themselves (a data file missing on one host, an error restoring a
    checkpoint), raised naming the processes that failed before this one (`reraise_naming_others`)."""
    if _progress is not None or (client := coordination_client()) is None:
        yield
        return
    with _watched(client, []):
        try:
            yield
        except BaseException as error:
            if (_runs, jax.process_index()) in _published:  # the steps' handling published it, and named the others
                raise
            publish_failure(error)
            reraise_naming_others(error)


@contextlib.contextmanager
def watching(progress: Callable[[], Any] = lambda: None, saving: Callable[[], Any] = lambda: False) -> Iterator[None]:
    """Around a multi-process `train()`'s steps: a thread logs the first failure another process publishes,
    `WATCH_GRACE_SECONDS` after it is published unless the block ended meanwhile, then ends this process if
    `progress()` (any value that changes as the steps go on) stays the same for `EXIT_AFTER_SECONDS`
    (`SAVE_EXIT_AFTER_SECONDS` while `saving()`: a checkpoint save is being written), unless this process publishes
    a failure of its own meanwhile. Stopped (within `WATCH_POLL_SECONDS`) when the block ends, failing or not.
    Inside `running`, it joins that watch."""
    signals = (progress, saving)
    if _progress is not None:
        _progress.append(signals)
        try:
            yield
        finally:
            _progress.remove(signals)
        return
    if (client := coordination_client()) is None:
        yield
        return
    with _watched(client, [signals]):
        yield


@contextlib.contextmanager
def _watched(client: Any, signals: list[tuple[Callable[[], Any], Callable[[], Any]]]) -> Iterator[None]:
    """One `train()` of the job (its own keys), watched by one thread until the block ends."""
    global _runs, _progress
    _runs, _progress = _runs + 1, signals
    run, own_index, stop = _runs, jax.process_index(), threading.Event()
    thread = threading.Thread(target=watch, args=(client, f"{FIRST_KEY}{run}", own_index, stop,
                                                  lambda: [read(progress) for progress, _ in list(signals)],
                                                  lambda: any(read(saving) for _, saving in list(signals)),
                                                  lambda: (run, own_index) in _published),
                              name="easytrain-failure-watch", daemon=True)
    thread.start()
    try:
        yield
    finally:
        _progress = None
        stop.set()
        thread.join(WATCH_POLL_SECONDS + LOOKUP_SECONDS)


def read(signal: Callable[[], Any]) -> Any:
    """`signal()`, or None if it raised (read from the watcher thread, it must not end the watch)."""
    try:
        return signal()
    except Exception:  # noqa: BLE001 - a signal that cannot be read shows no progress
        return None


def watch(client: Any, key: str, own_index: int, stop: threading.Event, progress: Callable[[], Any] = lambda: None,
          saving: Callable[[], Any] = lambda: False, failed: Callable[[], bool] = lambda: False) -> None:
    """Wait on `key` until `stop`; log the failure of another process found there, then end this process if it
    makes no progress for `EXIT_AFTER_SECONDS` (`end_if_stuck`). Once `failed()` (this process published a failure
    of its own: its own failure handling names the others), it stands down: it logs nothing and ends nothing."""
    while not stop.is_set():
        started = time.monotonic()
        try:
            value = client.blocking_key_value_get(key, int(WATCH_POLL_SECONDS * 1000))
        except Exception:  # noqa: BLE001 - nothing published yet (or no service: wait as long as a poll would)
            stop.wait(max(0.0, WATCH_POLL_SECONDS - (time.monotonic() - started)))
            continue
        # This process's steps ended meanwhile, or it failed too (the same error, met at the same step): its own failure
        # handling names the other.
        if stop.wait(WATCH_GRACE_SECONDS) or failed():
            return
        index, _, published = str(value).partition(" ")
        failure = parse([(index, published)], own_index)
        for other, (_, line) in failure.items():
            logger.error("process %d failed: %s. This process (%d) cannot go on without it: it fails when its "
                         "collectives give up, or ends itself if it makes no progress for %g s.", other, line,
                         own_index, EXIT_AFTER_SECONDS)
            end_if_stuck(f"process {other} failed: {line}", own_index, stop, progress, saving, failed)
        return


def end_if_stuck(failure: str, own_index: int, stop: threading.Event, progress: Callable[[], Any],
                 saving: Callable[[], Any] = lambda: False, failed: Callable[[], bool] = lambda: False) -> None:
    """`end_process` once `progress()` has not changed for `EXIT_AFTER_SECONDS` (`SAVE_EXIT_AFTER_SECONDS` while
    `saving()`), unless `stop` is set or this process has `failed()` itself first."""
    seen, since = progress(), time.monotonic()
    while not stop.wait(WATCH_POLL_SECONDS):
        if failed():
            return
        if (now := progress()) != seen:
            seen, since = now, time.monotonic()
        elif time.monotonic() - since >= (bound := SAVE_EXIT_AFTER_SECONDS if saving() else EXIT_AFTER_SECONDS):
            end_process(failure, own_index, bound)
            return


@contextlib.contextmanager
def before_ending(action: Callable[[], Any]) -> Iterator[None]:
    """Inside the block, `end_process` runs `action` before it ends the process: `train()` gives back its claim of
    output_dir there (`BaseTrainer._give_back_claim`), so a process ended before its first step was done (another
    process failed before it) leaves the older run in place, not in replaced_run/."""
    _before_ending.append(action)
    try:
        yield
    finally:
        _before_ending.remove(action)


def end_process(failure: str, own_index: int, waited: float) -> None:
    """Mark the running job failed with an `OtherProcessFailedError` naming `failure`, flush the logs, and exit.

    Called from the watcher thread while the main thread is blocked in a collective (C++ code that holds no Python
    frame to raise into: an exception set on that thread, or a signal handler, would run only once the collective
    returns, which it never does), so the process is ended as a SIGKILL would end it (`os._exit`): no `atexit`
    handler runs, and so JAX's exit barrier, which would wait for the failed process, is skipped. A checkpoint that
    completed stays whole (Orbax writes a step into a temporary directory and renames it once complete); one still
    being written leaves its temporary directory, removed by the next run.
    """
    error = OtherProcessFailedError(f"{failure}. This process ({own_index}) made no progress for "
                                    f"{waited:g} s after it (waiting in collectives that cannot complete "
                                    f"without that process): it ends with exit status {EXIT_CODE}")
    logger.error("%s", error)
    for action in list(_before_ending):
        bounded(action, seconds=30 * LOOKUP_SECONDS)  # moves back within output_dir: renames
    if (job := current_job()) is not None:
        bounded(lambda: job.fail(error), seconds=10 * LOOKUP_SECONDS)  # job.json (process 0), the trackers
    for handler in logging.getLogger().handlers + logger.handlers:
        with contextlib.suppress(Exception):
            handler.flush()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    exit_process(EXIT_CODE)


def publish_failure(error: BaseException) -> None:
    """On a failing process of a multi-process run (not one stopped by a signal): publish `error` at once, before
    the rest of the failure handling, so the others find it when their own collectives give up. Once a run: a
    failure published as it happened (a checkpoint write, from its writer thread: `save_barrier`) keeps its time."""
    if outcome_of(error) == "failed" and (client := coordination_client()) is not None and \
            (_runs, jax.process_index()) not in _published:
        publish(client, jax.process_index(), error)


def run_number() -> int:
    """The number of this `train()` in the job, the same on every process (keys scoped to one run use it)."""
    return _runs


def reraise_naming_others(error: BaseException) -> None:
    """Raise `error`, or, if other processes published a failure before this process published its own (or, if it
    published none, before now), an `OtherProcessFailedError` naming those, from `error`; failures published
    after it are only warned of. Call from the `except` block that caught `error`.

    An `EasytrainError` names its own cause (every process may raise the same one, e.g. a non-finite stop): it is
    raised as it is, after warnings naming other processes' different failures, looked up without waiting.
    """
    if outcome_of(error) != "failed" or not isinstance(error, Exception) or (client := coordination_client()) is None:
        raise error
    own_index, deliberate = jax.process_index(), isinstance(error, EasytrainError)
    own_time = _published.get((_runs, own_index), time.time())
    others = others_failures(client, own_index, wait_seconds=0.0 if deliberate else LOOKUP_SECONDS, before=own_time)
    if deliberate:
        others = {index: failure for index, failure in others.items() if failure[1] != describe(error)}
    first = earlier(others, own_index, own_time)
    warn_of_later(own_index, {index: failure for index, failure in others.items() if index not in first})
    if first and deliberate:
        logger.warning("%s", naming_error(error, own_index, first))
    elif first:
        raise naming_error(error, own_index, first) from error
    raise error
