"""Every process of a multi-process run decides the same start when its trainer is built: the same checkpoint to
resume, or the same refusal. Each process checks `output_dir` and `resume_from_checkpoint` on its own view of the
directory (`run_dir.check_output_dir`); one that raised alone (a run_info it may not read, a mount that does not
show the checkpoints yet) would leave the others to go on into set-up, where they wait in the first collective for
it, which names nothing until its deadline (about 30 s for Gloo on CPU, many minutes for NCCL); processes that
chose other steps would restore other states. One small gather of each process's choice or error settles it.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from easytrain.errors import ArgumentError
from easytrain.trainers.process_failure import OtherProcessFailedError, describe
from easytrain.trainers.shared_output_dir import Gather

#: Unicode code points of an error's message sent to the other processes (a longer one is cut).
MESSAGE_CODES = 4096
#: The same for each process's line in `agreed`'s gather, which every process receives from all: 4 KiB a process.
LINE_CODES = 1024
#: How often the processes decide before processes that chose other steps refuse, and the pause between: a mount
#: may show a step just saved a moment late (`shared_output_dir` looks for its token as often).
DECIDE_TRIES = 3
RETRY_SECONDS = 1.0
#: A checkpoint to resume (its checkpoints directory and step), or None for a fresh start.
Resume = tuple[Path, int] | None


def agreed(decide: Callable[[], Resume], gather: Gather | None) -> Resume:
    """`decide()` (this process's view of the checkpoint to resume), the same on every process: one that raised
    raises its own error, the others an `OtherProcessFailedError` naming it, and processes that chose other steps
    (a mount that shows a new checkpoint late) decide again, `DECIDE_TRIES` times in all, then all refuse. A process
    that raised alone would leave the others to wait in set-up's first collective, which names nothing. `gather`:
    every process's record, in process order (None: a single process, nothing to agree). An interrupt (Ctrl-C) is
    told the others too, then raised. Every process gathers as often as the others: all read the same rows."""
    if gather is None:
        return decide()
    look = decide
    for _ in range(DECIDE_TRIES):
        resume, rows = _gathered(look, gather)
        if failed := [f"process {index} failed: {decoded(row[1:]).removesuffix('.')}"
                      for index, row in enumerate(rows) if row[1]]:
            raise OtherProcessFailedError(f"{'; '.join(failed)}. Every process stops with it: all must start alike "
                                          "(the same output_dir and checkpoint, on storage each of them shares).")
        if len({int(row[0]) for row in rows}) == 1:
            return resume
        look = _after_pause(decide)
    chose = ", ".join(f"process {index}: {'none' if row[0] < 0 else f'step {row[0]}'}"
                      for index, row in enumerate(rows))
    raise ArgumentError("resume_from_checkpoint", f"the processes chose other checkpoints to resume ({chose}; looked "
                        f"{DECIDE_TRIES} times, {RETRY_SECONDS:g} s apart): a save was completed while they looked, "
                        "or some see the checkpoints directory late or not at all. Rerun once every host shows the "
                        "same checkpoints, or pass one step directory (<output_dir>/checkpoints/<step>).")


def _after_pause(decide: Callable[[], Resume]) -> Callable[[], Resume]:
    """`decide` again after `RETRY_SECONDS`, the pause part of the decision: an interrupt in it is gathered too."""
    def look() -> Resume:
        time.sleep(RETRY_SECONDS)
        return decide()
    return look


def _gathered(decide: Callable[[], Resume], gather: Gather) -> tuple[Resume, np.ndarray]:
    """This process's decision and every process's record (its step, -1 for none, and its error line), after one
    gather; a process whose decision raised raises it once the others have its line."""
    try:
        resume, failure = decide(), None
    except BaseException as error:  # each process must reach the gather the others wait in, whatever it raised
        resume, failure = None, error
    step = -1 if resume is None else resume[1]
    record = np.concatenate([[step], encoded(_line(failure), LINE_CODES)])
    try:
        rows = np.asarray(gather(record.astype(np.int32))).reshape(-1, record.size)
    except Exception as refusal:  # one the gather carried (other arguments, an output_dir not shared), which wins
        if failure is not None and not isinstance(failure, Exception):
            raise failure from None  # this process's interrupt stays one
        if failure is not None and refusal.__cause__ is None:
            raise refusal from failure  # this process's own error stays told, as the refusal's cause
        raise
    if failure is not None:
        raise failure
    return resume, rows


def _line(failure: BaseException | None) -> str:
    """What the others are told of this process's failure ('' for none): `describe`'s line, or the error's type
    where its message cannot be made (a broken `__str__` must not keep this process from the gather)."""
    try:
        return "" if failure is None else describe(failure)
    except Exception:  # noqa: BLE001 - the failure itself is raised after the gather
        return type(failure).__name__


def encoded(message: str, size: int = MESSAGE_CODES) -> np.ndarray:
    """`message` as `size` unicode code points (zero-padded; a longer one is cut), to send between processes."""
    codes = np.zeros(size, dtype=np.int32)
    sent = [ord(c) for c in message[:size]]
    codes[:len(sent)] = sent
    return codes


def decoded(codes: np.ndarray) -> str:
    """The message `encoded` sent."""
    return "".join(chr(c) for c in codes if c)
