"""`start_agreement.agreed`: whatever one process's decision raises, it reaches the gather every other process waits
in, so the others name it at construction instead of waiting there for it (a collective names nothing until its
deadline: tens of seconds for Gloo, many minutes for NCCL). Processes are threads joined by a stand-in gather."""

from __future__ import annotations

import threading
import types
from pathlib import Path

import pytest
from easytrain.checkpoint import CheckpointNotFoundError
from easytrain.errors import OutputDirError
from easytrain.trainers import run_dir, start_agreement
from easytrain.trainers.process_failure import OtherProcessFailedError
from easytrain.trainers.start_agreement import agreed
from runs import args_for, as_processes
from test_unreadable_records_agreement import Collective, _built_on, _checked_on, _process

RESUME = (Path("/run/checkpoints"), 4)


def _agreed_on(count: int, failing: dict[int, BaseException]) -> list:
    """`agreed` on `count` emulated processes, process `i` raising `failing[i]` in its decision: what each returned
    or raised (a gather that waits past 5 s for a process breaks its barrier)."""
    collective, outcomes = Collective(count, timeout=5), [None] * count

    def process(index: int) -> None:
        def decide():
            if index in failing:
                raise failing[index]
            return RESUME

        try:
            outcomes[index] = agreed(decide, collective.at(index))
        except BaseException as error:  # noqa: BLE001 - reported to the test, a KeyboardInterrupt too
            outcomes[index] = error

    as_processes(process, count, "agreed")
    return outcomes


def test_a_process_interrupted_while_deciding_is_named_on_the_others():
    """Ctrl-C (SIGINT is a KeyboardInterrupt in a multi-process run) reaches process 1 while it reads the
    checkpoints: it stops with it, and process 0 names it. Before: process 0 waited in the gather for process 1,
    which had left without it ('BrokenBarrierError' here, the collective's deadline in a real run)."""
    first, second = _agreed_on(2, {1: KeyboardInterrupt()})
    assert type(second) is KeyboardInterrupt, second
    assert isinstance(first, OtherProcessFailedError) and "process 1 failed: KeyboardInterrupt" in str(first), first


class _Unprintable(OSError):
    def __str__(self) -> str:
        raise RuntimeError("no message")


def test_an_error_that_cannot_be_printed_is_still_named_by_its_type():
    """Before: describing it raised in process 1 ahead of the gather, and process 0 waited there for it."""
    first, second = _agreed_on(2, {1: _Unprintable()})
    assert type(second) is _Unprintable, second
    assert isinstance(first, OtherProcessFailedError) and "process 1 failed: _Unprintable" in str(first), first


@pytest.mark.parametrize("message", ["\U0001F600 emoji", "a\x00NUL", "surrogate \udcff path", "x" * 5000])
def test_every_message_goes_through_the_gather_whole_or_cut(message):
    """Code points beyond the BMP, a lone surrogate (a path Python decoded with surrogateescape), a NUL (dropped)
    and a message longer than a process's line (cut): each process's record has the same size, and the line
    arrives as sent."""
    first, second = _agreed_on(2, {1: OSError(message)})
    expected = f"OSError: {message}".replace("\x00", "")[:1024]
    assert isinstance(first, OtherProcessFailedError) and f"process 1 failed: {expected}" in str(first), first
    assert type(second) is OSError, second


def test_processes_given_one_step_directory_resume_it_and_one_that_cannot_see_it_is_named(run_copy, monkeypatch):
    """`resume_from_checkpoint` naming a step directory (what the refusal of different `latest` steps advises): every
    process resumes that step; one whose mount does not show it raises its own `CheckpointNotFoundError`, and the
    others name it."""
    step_dir = run_copy / "checkpoints" / "2"
    args = args_for(run_copy, max_steps=6, resume_from_checkpoint=str(step_dir))
    outcomes, _ = _checked_on(2, args)
    assert outcomes == [(step_dir.parent, 2)] * 2, outcomes
    real = run_dir.resolve_checkpoint

    def unseen_on_process_1(output_dir, value):
        if getattr(_process, "index", None) == 1:
            raise CheckpointNotFoundError(f"{value} is not a complete checkpoint")
        return real(output_dir, value)

    monkeypatch.setattr(run_dir, "resolve_checkpoint", unseen_on_process_1)
    first, second = _checked_on(2, args)[0]
    assert type(second) is CheckpointNotFoundError, second
    assert isinstance(first, OtherProcessFailedError) and "process 1 failed: CheckpointNotFoundError" in str(first)


def test_a_step_one_process_sees_late_is_looked_for_again_before_refusing(monkeypatch):
    """Process 1's mount shows step 4 a moment late: its first look finds step 2, its second step 4. Every process
    looks again (`DECIDE_TRIES`, `RETRY_SECONDS` apart) and resumes step 4. Before: all refused at once
    ('ArgumentError: resume_from_checkpoint: the processes chose other checkpoints ...')."""
    monkeypatch.setattr(start_agreement, "RETRY_SECONDS", 0.0)
    looks = {0: [RESUME], 1: [(RESUME[0], 2), RESUME]}
    collective, outcomes = Collective(2, timeout=5), [None] * 2

    def process(index: int) -> None:
        try:
            outcomes[index] = agreed(lambda: looks[index].pop(0) if len(looks[index]) > 1 else looks[index][0],
                                     collective.at(index))
        except Exception as error:  # noqa: BLE001 - reported to the test
            outcomes[index] = error

    as_processes(process, 2, "agreed")
    assert outcomes == [RESUME, RESUME] and collective.calls == 2, outcomes


def test_a_process_refused_in_a_run_that_neither_saves_nor_resumes_is_named_on_the_others(tmp_path, monkeypatch):
    """save_strategy='no', nothing resumed: process 0 cannot write output_dir (its logs and export go there) and
    refuses; process 1 names it. Before: nothing was gathered, process 1 built its trainer and would have waited in
    set-up's first collective for process 0, named nowhere."""
    real = run_dir.check_writable

    def denied_on_process_0(directory):
        if getattr(_process, "index", None) == 0:
            raise OutputDirError(f"output_dir: cannot write to {str(directory)!r} (denied); choose a writable one.")
        return real(directory)

    monkeypatch.setattr(run_dir, "check_writable", denied_on_process_0)
    (first, second), collective = _built_on(2, args_for(tmp_path / "fresh", save_strategy="no"), monkeypatch)
    assert type(first) is OutputDirError, first
    assert isinstance(second, OtherProcessFailedError) and "process 0 failed: OutputDirError" in str(second), second
    assert collective.calls == 1


def test_a_process_interrupted_between_two_looks_is_named_on_the_others(monkeypatch):
    """The processes chose other steps and pause before looking again: Ctrl-C reaches process 1 in that pause. It
    stops with it, and process 0 names it at the next look. Before: process 0 waited in that look's gather."""
    def sleep(seconds: float) -> None:
        if threading.current_thread().name.endswith("(1)"):
            raise KeyboardInterrupt

    monkeypatch.setattr(start_agreement, "time", types.SimpleNamespace(sleep=sleep))
    collective, outcomes = Collective(2, timeout=5), [None] * 2

    def process(index: int) -> None:
        threading.current_thread().name = f"process ({index})"
        try:
            outcomes[index] = agreed(lambda: (RESUME[0], 2 + 2 * index), collective.at(index))
        except BaseException as error:  # noqa: BLE001 - reported to the test, a KeyboardInterrupt too
            outcomes[index] = error

    as_processes(process, 2, "agreed")
    assert type(outcomes[1]) is KeyboardInterrupt, outcomes
    assert isinstance(outcomes[0], OtherProcessFailedError) and "process 1 failed: KeyboardInterrupt" in str(
        outcomes[0]), outcomes
