"""`shared_output_dir`: processes that do not see process 0's output_dir all refuse alike; processes that share
it go on, and nothing of the check stays in output_dir. Processes are threads here, joined by a fake gather."""

import threading
from pathlib import Path

import numpy as np
import pytest

from easytrain.arguments import TrainingArguments
from easytrain.errors import ArgumentError, OutputDirError
from easytrain.trainers import shared_output_dir
from easytrain.trainers.run_dir import check_output_dir
from runs import as_processes


def run_processes(directories: list[Path]) -> list[BaseException | None]:
    """`check_processes_share` in one thread per directory (process index = position); what each raised."""
    count = len(directories)
    barrier, slots = threading.Barrier(count, timeout=60), [None] * count

    def gather_for(index):
        def gather(record):
            slots[index] = np.array(record)
            barrier.wait()
            stacked = np.stack(slots)
            barrier.wait()
            return stacked
        return gather

    outcomes: list[BaseException | None] = [None] * count

    def process(index):
        try:
            shared_output_dir.check_processes_share(directories[index], gather_for(index), is_main_process=index == 0)
        except BaseException as error:  # noqa: BLE001 - reported to the test
            outcomes[index] = error

    as_processes(process, count, "the check")
    return outcomes


def test_processes_sharing_output_dir_go_on_and_leave_nothing_there(tmp_path):
    run = tmp_path / "run"
    assert run_processes([run, run, run]) == [None, None, None]
    assert list(run.iterdir()) == [], "the token stayed in output_dir"
    assert check_output_dir(TrainingArguments(output_dir=str(run))) is None, "a fresh run still starts there"


def test_processes_given_other_output_dirs_all_refuse_alike(tmp_path):
    directories = [tmp_path / "run0", tmp_path / "run1", tmp_path / "run0"]
    outcomes = run_processes(directories)
    assert all(isinstance(error, ArgumentError) for error in outcomes), outcomes
    assert len({str(error) for error in outcomes}) == 1, "the processes raised different errors"
    error = outcomes[0]
    assert error.field == "output_dir"
    assert "process 1 cannot see" in error.message and "process 2" not in error.message
    assert str(directories[0]) in error.message and str(directories[1]) in error.message
    assert "shares" in error.message and "same --output_dir" in error.message
    assert not directories[0].exists(), "the refused check left output_dir (or its token) behind"
    assert not directories[1].exists(), "the process that cannot see process 0's output_dir wrote into its own"


def test_a_stale_token_of_an_earlier_run_does_not_pass_for_this_one(tmp_path):
    """Process 1's own disk holds the token an earlier run's process 0 left there (killed before removing it)."""
    directories = [tmp_path / "shared", tmp_path / "local"]
    directories[1].mkdir()
    stale = b"0123456789abcdef"
    (directories[1] / (shared_output_dir.TOKEN_PREFIX + stale.hex())).write_bytes(stale)
    outcomes = run_processes(directories)
    assert all(isinstance(error, ArgumentError) and "process 1" in error.message for error in outcomes), outcomes


def test_same_path_on_other_storage_is_named_as_such():
    message = shared_output_dir._message([1, 3], ["/mnt/run", "/mnt/run", "/mnt/run", "/mnt/run"])
    assert message.startswith("processes 1, 3 cannot see")
    assert "the same path on processes 1, 3, but other storage" in message


def test_process_0_that_cannot_write_stops_every_process(tmp_path):
    (blocker := tmp_path / "file").write_text("")
    outcomes = run_processes([blocker / "run", blocker / "run"])
    assert all(isinstance(error, OutputDirError) for error in outcomes), outcomes
    assert all("process 0 cannot write" in str(error) for error in outcomes)
    assert len({str(error) for error in outcomes}) == 1, "the processes raised different errors"
    assert isinstance(outcomes[0].__cause__, OSError), "process 0 shows why it could not write"


@pytest.mark.parametrize(("save_strategy", "resume", "needed"), [
    ("no", None, False), ("no", "none", False), ("steps", None, True), ("epoch", None, True),
    ("no", "latest", True), ("no", "/elsewhere/checkpoints/4", True)])
def test_only_runs_that_checkpoint_or_resume_are_checked(tmp_path, save_strategy, resume, needed):
    """Without checkpoints each process writes nothing to output_dir, or only process 0 does (logs, export)."""
    args = TrainingArguments(output_dir=str(tmp_path), save_strategy=save_strategy, resume_from_checkpoint=resume)
    assert shared_output_dir.needs_check(args) is needed


def test_a_single_process_writes_no_token(tmp_path):
    assert check_output_dir(TrainingArguments(output_dir=str(tmp_path / "run"), save_strategy="steps")) is None
    assert list((tmp_path / "run").iterdir()) == []


def test_no_token_is_left_when_a_gather_fails(tmp_path):
    """A peer dying or a signal during the second gather must not leave process 0's token in output_dir."""
    calls = []

    def gather(record):
        calls.append(record)
        if len(calls) == 2:
            raise KeyboardInterrupt("a signal during the second gather")
        return np.stack([record, record])

    with pytest.raises(KeyboardInterrupt):
        shared_output_dir.check_processes_share(tmp_path, gather, is_main_process=True)
    assert [p.name for p in tmp_path.iterdir()] == []


def test_a_refused_run_leaves_no_directory_it_created(tmp_path):
    """The check made process 0's output_dir (and its missing parents) to write its token: refused, it removes them."""
    directories = [tmp_path / "new" / "run0", tmp_path / "run1"]
    outcomes = run_processes(directories)
    assert all(isinstance(error, ArgumentError) for error in outcomes), outcomes
    assert sorted(p.name for p in tmp_path.iterdir()) == [], "the refused check left the directories it created"


def test_a_refused_run_keeps_directories_it_did_not_create_or_that_hold_files(tmp_path):
    existing = tmp_path / "existing"
    existing.mkdir()
    (existing / "notes.txt").write_text("mine")
    outcomes = run_processes([existing, tmp_path / "other"])
    assert all(isinstance(error, ArgumentError) for error in outcomes), outcomes
    assert [p.name for p in existing.iterdir()] == ["notes.txt"]

    created = tmp_path / "made" / "run"
    calls = []

    def gather(record):  # a file written into the new output_dir during the check, then a refusal
        calls.append(record)
        if len(calls) == 2:
            (created / "late.txt").write_text("another writer")
            return np.array([1, 0], dtype=np.uint8)
        return np.stack([record, record])

    with pytest.raises(ArgumentError):
        shared_output_dir.check_processes_share(created, gather, is_main_process=True)
    assert [p.name for p in created.iterdir()] == ["late.txt"], "a directory holding a file was removed"


def test_a_failed_gather_or_an_unwritable_dir_leaves_no_directory_it_created(tmp_path, monkeypatch):
    def failing(record):
        raise KeyboardInterrupt("a signal during the gather")

    with pytest.raises(KeyboardInterrupt):
        shared_output_dir.check_processes_share(tmp_path / "a" / "b", failing, is_main_process=True)
    assert not (tmp_path / "a").exists()
    monkeypatch.setattr(shared_output_dir, "_token_name", lambda nonce: "missing/token")  # the write fails
    outcomes = run_processes([tmp_path / "made" / "run"] * 2)
    assert all(isinstance(error, OutputDirError) for error in outcomes), outcomes
    assert list(tmp_path.iterdir()) == []


def test_a_passing_run_keeps_the_output_dir_the_check_created(tmp_path):
    run = tmp_path / "new" / "run"
    assert run_processes([run, run]) == [None, None]
    assert run.is_dir() and list(run.iterdir()) == []
