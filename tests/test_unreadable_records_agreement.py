"""The processes of one run that see the resumed checkpoint differently (one cannot read its run_info, or finds
another `latest`), or the run_info of a LoRA run's `init_weights_from` source, all refuse when their trainers are
built, alike: a process that raised alone left the others to wait in set-up's first collective, which names nothing
until its deadline (tens of seconds to many minutes). Processes are threads here, joined by a stand-in for
`multihost_utils.process_allgather`."""

from __future__ import annotations

import functools
import threading
from pathlib import Path

import jax
import numpy as np
import pytest
from easytrain import BaseTrainer
from easytrain.errors import ArgumentError, CheckpointReadError
from easytrain.trainers import run_dir
from easytrain.trainers.process_failure import OtherProcessFailedError
from easytrain.trainers.run_dir import check_output_dir
from jax.experimental import multihost_utils
from runs import args_for, as_processes, snapshot


class Collective:
    """`count` threads standing for processes: each `at(index)` call returns every thread's record, stacked in
    process order, once all have given theirs (`multihost_utils.process_allgather`)."""

    def __init__(self, count: int, timeout: float = 60) -> None:
        self.barrier, self.records, self.calls = threading.Barrier(count, timeout=timeout), [None] * count, 0

    def at(self, index: int):
        return functools.partial(self._gather, index)

    def _gather(self, index: int, record: np.ndarray) -> np.ndarray:
        self.records[index] = np.array(record)
        self.calls += index == 0
        self.barrier.wait()
        stacked = np.stack(self.records)
        self.barrier.wait()
        return stacked


#: Which emulated process the current thread is (`_checked_on`), for a view of the directory of that process's own.
_process = threading.local()


def _checked_on(count: int, args) -> tuple[list, Collective]:
    """`check_output_dir` on `count` emulated processes (process 0 the main one): what each returned or raised."""
    collective, outcomes = Collective(count), [None] * count

    def process(index: int) -> None:
        _process.index = index
        try:
            outcomes[index] = check_output_dir(args, is_main_process=index == 0, gather=collective.at(index))
        except Exception as error:  # noqa: BLE001 - reported to the test
            outcomes[index] = error

    as_processes(process, count, "check_output_dir")
    return outcomes, collective


def _deny_run_info_on_process_1(monkeypatch) -> None:
    """Process 1 may not read any run_info (its host's mount, its user); the others read as usual."""
    real = Path.read_text

    def denied_on_process_1(path, *args, **kwargs):
        if getattr(_process, "index", None) == 1 and path.parent.name == "run_info":
            raise PermissionError(13, "Permission denied", str(path))
        return real(path, *args, **kwargs)

    monkeypatch.setattr(Path, "read_text", denied_on_process_1)


def test_a_process_that_cannot_read_the_resumed_run_info_stops_every_process_at_construction(run_copy, monkeypatch):
    """Process 1 is denied the read (its host's mount, its user): it raises its own `CheckpointReadError`, and
    process 0, which read the record, raises naming it instead of going on to wait in set-up's first collective.
    Before: process 0 returned the checkpoint to resume."""
    _deny_run_info_on_process_1(monkeypatch)
    before = snapshot(run_copy)
    (first, second), collective = _checked_on(2, args_for(run_copy, max_steps=6, resume_from_checkpoint="latest"))
    assert isinstance(second, CheckpointReadError) and "PermissionError" in str(second), second
    assert isinstance(first, OtherProcessFailedError), first
    assert "process 1" in str(first) and "CheckpointReadError" in str(first) and "PermissionError" in str(first)
    assert collective.calls == 2 and snapshot(run_copy) == before  # output_dir's token, then the decisions


def test_processes_that_find_another_latest_checkpoint_all_refuse(run_copy, monkeypatch):
    """Process 1 does not see step 4 yet (a mount that shows a new directory late): the processes would restore
    different steps. Every one refuses, naming both."""
    real = run_dir.resolve_checkpoint

    def older_on_process_1(output_dir, value):
        root, step = real(output_dir, value)
        return (root, 2) if getattr(_process, "index", None) == 1 else (root, step)

    monkeypatch.setattr(run_dir, "resolve_checkpoint", older_on_process_1)
    outcomes, _ = _checked_on(2, args_for(run_copy, max_steps=6, resume_from_checkpoint="latest"))
    for outcome in outcomes:
        assert isinstance(outcome, ArgumentError) and outcome.field == "resume_from_checkpoint", outcome
        assert "process 0: step 4" in str(outcome) and "process 1: step 2" in str(outcome), outcome


def test_processes_that_agree_resume_the_same_checkpoint(run_copy):
    outcomes, collective = _checked_on(3, args_for(run_copy, max_steps=6, resume_from_checkpoint="latest"))
    assert outcomes == [(run_copy.absolute() / "checkpoints", 4)] * 3 and collective.calls == 2


def test_a_refusal_every_process_meets_is_each_ones_own(run_copy):
    """A run_info damaged for all: every process raises the same `CheckpointReadError`, none names another's."""
    (run_copy / "checkpoints" / "4" / "run_info" / "metadata").write_text("{")
    outcomes, _ = _checked_on(2, args_for(run_copy, max_steps=6, resume_from_checkpoint="latest"))
    assert all(type(outcome) is CheckpointReadError for outcome in outcomes), outcomes


@pytest.mark.parametrize("save_strategy", ["steps", "no"])
def test_a_process_that_cannot_read_the_lora_source_run_info_stops_every_trainer_at_construction(
        run_copy, tmp_path, monkeypatch, save_strategy):
    """`init_weights_from` under LoRA compares the source's run_info with this run's scaling when the trainer is
    built. Process 1 is denied that read: it raises its own `CheckpointReadError`, process 0 one naming it. Before,
    the check ran ahead of the agreement: process 1 raised alone and process 0 waited in its gather for it. A run
    that neither saves nor resumes gathers too (else process 0 would build its trainer)."""
    _deny_run_info_on_process_1(monkeypatch)
    args = args_for(tmp_path / "fresh", lora_rank=4, init_weights_from=str(run_copy / "checkpoints" / "4"),
                    save_strategy=save_strategy)
    (first, second), collective = _built_on(2, args, monkeypatch)
    assert isinstance(second, CheckpointReadError) and "init_weights_from" in str(second), second
    assert isinstance(first, OtherProcessFailedError), first
    assert "process 1" in str(first) and "CheckpointReadError" in str(first) and "PermissionError" in str(first)
    assert collective.calls == (2 if save_strategy == "steps" else 1)  # output_dir's token where it saves


def _built_on(count: int, args, monkeypatch, build=BaseTrainer) -> tuple[list, Collective]:
    """`build(args)` (a `BaseTrainer`) on `count` emulated processes: what each built or raised. Each thread reports
    its own process index, and several processes (`check_output_dir` then gathers, through `collective`)."""
    collective, outcomes = Collective(count, timeout=20), [None] * count
    monkeypatch.setattr(jax, "process_index", lambda: getattr(_process, "index", 0))
    monkeypatch.setattr(run_dir, "_process_count", lambda: count)
    monkeypatch.setattr(jax, "process_count", lambda: count)  # the trainer asks JAX too
    monkeypatch.setattr(multihost_utils, "process_allgather", lambda record: collective.at(_process.index)(record))

    def process(index: int) -> None:
        _process.index = index
        try:
            outcomes[index] = build(args)
        except Exception as error:  # noqa: BLE001 - reported to the test
            outcomes[index] = error

    as_processes(process, count, "BaseTrainer")
    return outcomes, collective
