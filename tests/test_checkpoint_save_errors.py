"""A background save that failed (a full disk) is reported as soon as it has ended, without waiting for a save
still being written: the loop asks at every log step instead of finding out at the next save. It is one
`CheckpointWriteError` naming the failed step, the cause, the checkpoint kept and how to resume; the next save,
started before anything asked, reports it as that failed step's, not as its own."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path

import jax.numpy as jnp
import pytest
from orbax.checkpoint._src.path import atomicity

from easytrain.checkpoint import CheckpointManager
from easytrain.errors import CheckpointWriteError

STATE = {"w": jnp.arange(4.0)}


def test_a_failed_background_save_is_raised_once_it_ended(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    go = threading.Event()

    async def disk_full(self) -> None:
        go.wait(60)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(atomicity.AtomicRenameTemporaryPath, "finalize", disk_full)  # the final rename
    manager = CheckpointManager(tmp_path, owner=True)
    assert manager.save(1, state=STATE, data_state={}, run_info={})
    manager.raise_failed_save()  # still being written: returns at once
    go.set()
    with pytest.raises(CheckpointWriteError, match="step 1 could not be written: the disk is full"):
        for _ in range(6000):  # the save ends in the background; the loop asks at every log step
            manager.raise_failed_save()
            threading.Event().wait(0.01)
    manager.raise_failed_save()  # raised once
    monkeypatch.undo()
    assert manager.save(2, state=STATE, data_state={}, run_info={})
    manager.close()
    assert manager.all_steps() == [2]


def test_the_next_save_names_the_step_that_failed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Step 1's background save fails while step 2's is being started: the error is step 1's (Orbax's save would wait
    for it too, and its failure would be named as step 2's)."""
    go = threading.Event()

    async def disk_full(self) -> None:
        go.wait(60)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(atomicity.AtomicRenameTemporaryPath, "finalize", disk_full)
    manager = CheckpointManager(tmp_path, owner=True)
    assert manager.save(1, state=STATE, data_state={}, run_info={})
    go.set()
    with pytest.raises(CheckpointWriteError, match="step 1 could not be written: the disk is full") as raised:
        manager.save(2, state=STATE, data_state={}, run_info={})
    assert raised.value.step == 1
    monkeypatch.undo()
    manager.close()


def test_a_failed_synchronous_save_leaves_no_writer_running(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """One writer of a save fails (a full disk) while another is still writing: the error is raised once the other
    has ended, not left to fail at interpreter exit with screens of 'cannot schedule new futures'."""
    from orbax.checkpoint._src.handlers import json_checkpoint_handler

    original = json_checkpoint_handler.JsonCheckpointHandler._save_fn

    async def writes(self, x, directory):
        name = str(directory).rsplit("/", 1)[-1]
        if name.startswith("progress"):
            raise OSError(28, "No space left on device")
        if name.startswith("run_info"):
            await asyncio.sleep(0.5)  # a large item, still being written when the other fails
        return await original(self, x, directory)

    monkeypatch.setattr(json_checkpoint_handler.JsonCheckpointHandler, "_save_fn", writes)
    manager = CheckpointManager(tmp_path, async_save=False, owner=True)
    before = set(threading.enumerate())
    with pytest.raises(CheckpointWriteError, match="step 1 could not be written: the disk is full"):
        manager.save(1, state=STATE, data_state={}, run_info={})
    assert [t.name for t in threading.enumerate() if t not in before and not t.daemon] == []
    monkeypatch.undo()
    manager.close()


def test_the_loop_stops_at_the_first_log_after_a_background_save_failed(tmp_path: Path,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """A save at step 2 fails in the background (a full disk): the run stops at step 3's log, not after training
    on to the next save at step 4 (steps whose logs a resume would then drop)."""
    from easytrain import BaseTrainer, Callback, TrainingArguments
    from runs import logged

    failed = threading.Event()
    original = atomicity.AtomicRenameTemporaryPath.finalize

    async def disk_full_once(self) -> None:
        if failed.is_set():
            return await original(self)
        failed.set()
        raise OSError(28, "No space left on device")

    class SaveEndsBeforeStepThreesLog(Callback):  # the save has ended (failed) by the time step 3 logs
        def on_log(self, trainer, step, logs):
            if step == 3:
                failed.wait(60)
                while trainer.loop.manager.is_saving():
                    threading.Event().wait(0.01)

    monkeypatch.setattr(atomicity.AtomicRenameTemporaryPath, "finalize", disk_full_once)
    args = TrainingArguments(output_dir=str(tmp_path / "run"), max_length=16, train_batch_size=4, max_steps=6,
                             logging_steps=1, save_steps=2, eval_strategy="no", report_to=["jsonl"],
                             disable_progress_bar=True, save_pretrained_at_end=False, max_train_samples=32)
    with pytest.raises(CheckpointWriteError, match="step 2 could not be written: the disk is full"):
        BaseTrainer(args, callbacks=[SaveEndsBeforeStepThreesLog()]).train()
    assert max(logged(tmp_path / "run")) == 3


def fail_progress_of(step: int, error: Exception, monkeypatch: pytest.MonkeyPatch) -> None:
    """The `progress` item of checkpoint `step` fails to be written with `error` (a full disk); others are written."""
    from orbax.checkpoint._src.handlers import json_checkpoint_handler

    original = json_checkpoint_handler.JsonCheckpointHandler._save_fn

    async def writes(self, x, directory):
        path = str(directory)
        if path.rsplit("/", 1)[-1].startswith("progress") and f"/{step}.orbax-checkpoint-tmp" in path:
            raise error
        return await original(self, x, directory)

    monkeypatch.setattr(json_checkpoint_handler.JsonCheckpointHandler, "_save_fn", writes)


ENOSPC = OSError(28, "No space left on device")
TENSORSTORE_FULL = ValueError('RESOURCE_EXHAUSTED: Error writing local file "x/_sharding": Failed to write 631 bytes '
                              "to file 5: No space left on device [os_error_code='28']")


@pytest.mark.parametrize("error", [ENOSPC, TENSORSTORE_FULL], ids=["OSError", "tensorstore"])
def test_a_full_disk_names_the_failed_save_the_checkpoint_kept_and_the_resume(tmp_path: Path, error: Exception,
                                                                              monkeypatch: pytest.MonkeyPatch,
                                                                              caplog: pytest.LogCaptureFixture) -> None:
    """A save that fails for a full disk is one `CheckpointWriteError`: which step's save failed, that the disk is
    full, the newest complete checkpoint (intact), and how to resume; Orbax's own tracebacks of it are not logged."""
    directory = tmp_path / "run" / "checkpoints"
    manager = CheckpointManager(directory, owner=True)
    assert manager.save(3, state=STATE, data_state={}, run_info={})
    manager.wait_until_finished()
    fail_progress_of(6, error, monkeypatch)
    assert manager.save(6, state=STATE, data_state={}, run_info={})
    with pytest.raises(CheckpointWriteError) as raised:
        manager.wait_until_finished()
    message = str(raised.value)
    assert "checkpoint of step 6 could not be written: the disk is full" in message, message
    assert "No space left on device" in message and "Traceback" not in message
    assert f"newest complete checkpoint, {directory / '3'}, is intact" in message, message
    assert "--resume_from_checkpoint latest" in message and f"--config {tmp_path / 'run'}/arguments.json" in message
    assert raised.value.step == 6 and raised.value.latest == 3
    assert [r.getMessage() for r in caplog.records if r.name == "absl" and r.exc_info] == []
    assert manager.all_steps() == [3]
    assert [p.name for p in directory.iterdir()] == ["3"]  # the failed save's partial files are gone
    monkeypatch.undo()
    assert manager.save(6, state=STATE, data_state={}, run_info={})
    manager.close()
    assert manager.all_steps() == [3, 6]


def test_a_full_disk_at_the_first_save_says_no_checkpoint_was_kept(tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    fail_progress_of(2, ENOSPC, monkeypatch)
    manager = CheckpointManager(tmp_path / "checkpoints", async_save=False, owner=True)
    with pytest.raises(CheckpointWriteError, match="checkpoint of step 2 could not be written: the disk is full") \
            as raised:
        manager.save(2, state=STATE, data_state={}, run_info={})
    assert "No complete checkpoint was written yet" in str(raised.value) and raised.value.latest is None
    monkeypatch.undo()
    manager.close()


def test_a_failed_save_for_another_reason_is_not_called_a_full_disk(tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    fail_progress_of(1, PermissionError(13, "Permission denied"), monkeypatch)
    manager = CheckpointManager(tmp_path, owner=True)
    manager.save(1, state=STATE, data_state={}, run_info={})
    with pytest.raises(CheckpointWriteError, match=r"step 1 could not be written \(PermissionError: \[Errno 13\] "
                                                   "Permission denied\\)") as raised:
        manager.wait_until_finished()
    assert "disk is full" not in str(raised.value)
    monkeypatch.undo()
    manager.close()


def test_a_failure_that_is_not_a_write_passes_through_unchanged(tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """A save that fails at Orbax's barrier because another process died is not a write failure: called one, it would
    hide `OtherProcessFailedError`'s naming of the process that failed first (`process_failure`)."""
    barrier = RuntimeError("DEADLINE_EXCEEDED: Barrier timed out. Id: CheckpointManager:save:1")
    fail_progress_of(1, barrier, monkeypatch)
    manager = CheckpointManager(tmp_path, owner=True)
    manager.save(1, state=STATE, data_state={}, run_info={})
    with pytest.raises(RuntimeError, match="Barrier timed out") as raised:
        manager.wait_until_finished()
    assert not isinstance(raised.value, CheckpointWriteError)
    monkeypatch.undo()
    manager.close()
