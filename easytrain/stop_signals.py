"""SIGTERM and SIGINT as a flag from the moment a run starts, so that a stop before its first step ends it cleanly.

Schedulers send SIGTERM (and SIGKILL some seconds later) at any time, also while a run starts, loads its data,
restores its checkpoint or compiles, which can take minutes. Python's default action there killed the process
(status 143) or raised `KeyboardInterrupt` anywhere, leaving `job.json` `queued`. While a `catch` is in force:

- the first signal sets a flag (`received`), which the run reads where stopping leaves nothing half done
  (`check`, between phases; never inside the claim of its output directory or a write of its files);
- inside an `interruptible` section (a phase that writes nothing of the run: starting, preparing the data,
  building or restoring the model) it also raises `SignalInterrupt` at once. That is a `KeyboardInterrupt`, after
  which the libraries running there (`datasets`, `huggingface_hub`) clean up as they do after Ctrl-C; a long
  tokenisation is not waited for;
- a second signal gets the action it had before the catch (SIGTERM: the process dies at once).

`easytrain.trainers.preemption` turns a `SignalInterrupt` into `TrainingPreempted` (exit status 75). This module
uses the standard library only: the `easytrain` command catches from its first line, before it imports JAX.
"""

from __future__ import annotations

import contextlib
import logging
import signal
import threading
from collections.abc import Iterator
from types import FrameType
from typing import Any

__all__ = ["PREEMPTED_EXIT_CODE", "STOP_SIGNALS", "SignalInterrupt", "catch", "catching", "check", "interruptible",
           "received", "release", "while_acting"]

#: Exit status of a run stopped by SIGTERM/SIGINT, nothing lost (sysexits' EX_TEMPFAIL: "temporary failure, try
#: again"). Job scripts can requeue on it: the next start resumes.
PREEMPTED_EXIT_CODE = 75
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)

logger = logging.getLogger("easytrain")


class SignalInterrupt(KeyboardInterrupt):
    """A stop signal acted on before training: at once inside an `interruptible` section, else at a `check`.

    A `KeyboardInterrupt`, so the code it interrupts cleans up as after Ctrl-C.
    """

    def __init__(self, signal_name: str, during: str):
        super().__init__(f"{signal_name} received while {during}")
        self.signal_name, self.during = signal_name, during


_previous: dict[signal.Signals, Any] = {}  # the handlers `catch` replaced; empty while nothing is caught
_received: str | None = None
_sections: list[str] = []  # the interruptible sections the main thread is in, innermost last
_plans: list[str] = []  # what happens after a signal outside a section, innermost last (`while_acting`)


def _on_main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


def catch(signals: tuple[signal.Signals, ...] = STOP_SIGNALS) -> bool:
    """Turn `signals` into a flag until `release`. Returns whether this call started catching: False when a catch
    is in force already (its flag is shared; whoever started it releases it), for no signals, or off the main
    thread (Python sets handlers on the main thread only)."""
    global _received
    if _previous or not signals or not _on_main_thread():
        return False
    _received = None
    for sig in signals:
        previous = signal.signal(sig, _handle)
        _previous[sig] = signal.SIG_DFL if previous is None else previous  # None: set outside Python
    return True


def catching() -> bool:
    return bool(_previous)


def release(*, redeliver: bool = False) -> None:
    """Give the signals their former handlers back and forget a caught signal; with `redeliver`, a caught one gets
    its former action now (for code that will not look at the flag: as if it had never been caught)."""
    global _received
    if not _previous or not _on_main_thread():
        return
    pending, _received = _received, None
    for sig, handler in _previous.items():
        signal.signal(sig, handler)
    _previous.clear()
    if redeliver and pending is not None:
        signal.raise_signal(signal.Signals[pending])


def received() -> str | None:
    """The name of the signal caught since `catch`, if any."""
    return _received


def check(during: str) -> None:
    """Raise `SignalInterrupt` if a stop signal was caught: call it where stopping leaves nothing half done."""
    if _received is not None:
        raise SignalInterrupt(_received, during)


@contextlib.contextmanager
def interruptible(during: str) -> Iterator[None]:
    """A phase that writes nothing of the run (`during` says what it does): a stop signal raises `SignalInterrupt`
    at once instead of waiting for its end, one caught before it on entering. Off the main thread, where signals
    are not delivered, a `check` on entering only."""
    check(during)
    if not _on_main_thread():
        yield
        return
    _sections.append(during)
    try:
        yield
    finally:
        _sections.pop()


@contextlib.contextmanager
def while_acting(plan: str) -> Iterator[None]:
    """Say, in the warning a signal logs, what the run does about it in this block (the loop: finish the step)."""
    _plans.append(plan)
    try:
        yield
    finally:
        _plans.pop()


def _handle(signum: int, frame: FrameType | None) -> None:
    global _received
    sig = signal.Signals(signum)
    signal.signal(sig, _previous.get(sig, signal.SIG_DFL))  # a second signal is not graceful
    _received = _received or sig.name
    if _sections:
        logger.warning("%s received while %s: stopping now", sig.name, _sections[-1])
        raise SignalInterrupt(sig.name, _sections[-1])
    plan = _plans[-1] if _plans else "stopping before the next step of the set-up"
    logger.warning("%s received: %s (send it again to stop immediately)", sig.name, plan)
