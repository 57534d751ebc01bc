"""A checkpoint save that fails on one process of a multi-process run ends every process within seconds, each with
the error that says what happened: the failing process its own (a full disk, the step, the checkpoint kept), the
others an `OtherProcessFailedError` naming it; the newest complete checkpoint stays intact."""

import json
import threading

import jax
import pytest

from easytrain import save_barrier, save_failures
from easytrain.checkpoint_dirs import finalized_steps
from runs import train_on_localhost
from test_multiprocess import free_port


def barrier_timeout() -> TimeoutError:
    """What Orbax raises on the process left waiting at its barrier for a process whose write failed."""
    try:
        try:
            raise RuntimeError("DEADLINE_EXCEEDED: Barrier timed out. Id: _async_write_complete.4::0")
        except RuntimeError as error:
            raise TimeoutError("Timed out while waiting for async_write_complete barrier.") from error
    except TimeoutError as error:
        return error


def test_a_barrier_timeout_is_no_write_failure():
    """A TimeoutError is an OSError, but the storage refused nothing: the process that waited reports the other
    process's failure, not a CheckpointWriteError telling its user to fix a cause it does not know."""
    assert not save_failures.is_write_failure(barrier_timeout())
    assert save_failures.is_write_failure(OSError(28, "No space left on device"))
    assert save_failures.is_write_failure(PermissionError(13, "Permission denied"))


@pytest.fixture
def two_processes_barrier(process_0_of_2, monkeypatch):
    """Process 0 of 2 at `save_barrier.barrier`, polling every 50 ms, with fresh barrier counts."""
    monkeypatch.setattr(jax, "process_count", lambda: 2)
    monkeypatch.setattr(save_barrier, "POLL_SECONDS", 0.05)
    monkeypatch.setattr(save_barrier, "_calls", {})
    monkeypatch.setattr(save_barrier, "_passed", [])
    return process_0_of_2


def test_the_save_barrier_passes_once_every_process_arrived(two_processes_barrier):
    other = threading.Timer(0.2, lambda: two_processes_barrier.key_value_set(
        f"{save_barrier.BARRIER_KEY}0/async_write_complete.4/1/1", "1"))
    other.start()
    save_barrier.barrier(key="async_write_complete.4", timeout_ms=10_000)
    with pytest.raises(TimeoutError, match="process 1 at Orbax's barrier 'async_write_complete.4'"):
        save_barrier.barrier(key="async_write_complete.4", timeout_ms=300)  # its second call: process 1 is not there


def test_a_passed_barrier_key_is_kept_until_the_next_barrier_is_passed(two_processes_barrier):
    """A slower process may still be polling for this process's key after this one passed: deleted at once, that
    process would wait Orbax's whole timeout. No process passes the next barrier before reading it, so the key
    goes then (the store keeps one per process)."""
    client, base = two_processes_barrier, f"{save_barrier.BARRIER_KEY}0/async_write_complete.4/"
    client.key_value_set(f"{base}1/1", "1")  # process 1 is there first
    save_barrier.barrier(key="async_write_complete.4", timeout_ms=10_000)
    assert f"{base}1/0" in client.store, "process 1 may still be waiting for it"
    client.key_value_set(f"{base}2/1", "1")
    save_barrier.barrier(key="async_write_complete.4", timeout_ms=10_000)
    assert f"{base}1/0" not in client.store and f"{base}2/0" in client.store


def test_the_save_barrier_gives_up_once_another_process_could_not_write(two_processes_barrier):
    """Process 1's part of the save failed: it never arrives, and process 0 stops waiting for it at once (not after
    Orbax's 20 minutes), naming it; its own failed write never ends its wait."""
    save_barrier.publish_failed_write(OSError(28, "No space left on device"))  # process 0's own
    with pytest.raises(TimeoutError):
        save_barrier.barrier(key="set_value_start", timeout_ms=300)
    two_processes_barrier.key_value_set(f"{save_barrier.FAILED_WRITE_KEY}0/1", "CheckpointWriteError: disk full")
    with pytest.raises(save_failures.SaveAbandonedError, match="^process 1 could not write its part of the "
                       "checkpoint: this process stopped waiting for it at Orbax's barrier 'async_write_complete.4'"):
        save_barrier.barrier(key="async_write_complete.4", timeout_ms=600_000)


FLAGS = ["--max_length", "16", "--train_batch_size", "8", "--logging_steps", "1", "--eval_strategy", "no",
         "--save_strategy", "steps", "--save_steps", "2", "--report_to", "jsonl", "--disable_progress_bar",
         "--save_pretrained_at_end", "false", "--max_steps", "6", "--validation_split_percentage", "0"]


@pytest.mark.slow
@pytest.mark.parametrize("failing", [1, 0])
def test_a_save_failing_on_one_process_ends_both_with_its_error(tmp_path, tokenizer_dir, text_lines, failing):
    """One process cannot write its part of step 4's checkpoint (a full disk). Before: both processes waited at
    Orbax's barrier for the other for 20 minutes, then the other blamed itself for a write failure."""
    (train := tmp_path / "train.txt").write_text("\n".join(text_lines) + "\n")
    run = tmp_path / "run"
    codes, outputs = train_on_localhost(
        [["--output_dir", str(run), "--train_file", str(train), "--tokenizer_name", tokenizer_dir, *FLAGS,
          "--task", f"tests.workers.failing_save_task:DiskFullOnProcess{['Zero', 'One'][failing]}"]
         for _ in range(2)],
        free_port(), timeout=150)
    assert 0 not in codes, f"exit statuses {codes}"
    written = "the checkpoint of step 4 could not be written: the disk is full"
    other = 1 - failing
    assert f"error: {written}" in outputs[failing], outputs[failing][-3000:]
    assert f"{run / 'checkpoints' / '2'}, is intact" in outputs[failing], outputs[failing][-3000:]
    assert f"error: process {failing} failed: CheckpointWriteError: {written}" in outputs[other], outputs[other][-3000:]
    assert "Fix the cause" not in outputs[other], outputs[other][-3000:]  # not a write failure of its own
    assert finalized_steps(run / "checkpoints") == [2]
    record = json.loads((run / "job.json").read_text())  # process 0's: its own error, or the one naming process 1
    assert record["status"] == "failed", record
    named = [("CheckpointWriteError", written), ("OtherProcessFailedError", f"process 1 failed: CheckpointWriteError: "
                                                                            f"{written}")][failing]
    assert (record["error"]["type"], record["error"]["message"][:len(named[1])]) == named, record
