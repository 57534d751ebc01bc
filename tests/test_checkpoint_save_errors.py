"""A background save that failed (a full disk) is reported as soon as it has ended, without waiting for a save
still being written: the loop asks at every log step instead of finding out at the next save."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path

import jax.numpy as jnp
import pytest
from orbax.checkpoint._src.path import atomicity

from easytrain.checkpoint import CheckpointManager

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
    with pytest.raises(OSError, match="No space left"):
        for _ in range(6000):  # the save ends in the background; the loop asks at every log step
            manager.raise_failed_save()
            threading.Event().wait(0.01)
    manager.raise_failed_save()  # raised once
    monkeypatch.undo()
    assert manager.save(2, state=STATE, data_state={}, run_info={})
    manager.close()
    assert manager.all_steps() == [2]


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
    with pytest.raises(OSError, match="No space left"):
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
    with pytest.raises(OSError, match="No space left"):
        BaseTrainer(args, callbacks=[SaveEndsBeforeStepThreesLog()]).train()
    assert max(logged(tmp_path / "run")) == 3
