"""Readers of a live run's checkpoints (a duplicate start, a branch resumed from one of its steps) never delete
what that run is still writing, and a checkpoint gone by the time it is read is reported with the steps there now."""

from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path

import jax.numpy as jnp
import pytest
from orbax.checkpoint._src.handlers import json_checkpoint_handler

from easytrain.checkpoint import CheckpointManager
from easytrain.checkpoint_read_errors import resume_read_error

STATE = {"w": jnp.arange(4.0)}


def _save(manager: CheckpointManager, step: int) -> bool:
    return manager.save(step, state=STATE, data_state={"step": step}, run_info={"format_version": 1})


def _eventually(condition, seconds: float = 30.0) -> bool:
    """Whether `condition()` holds within `seconds`: Orbax may create a save's temporary directory on its
    background thread, after `save` has returned (a loaded machine showed it missing right after)."""
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


def test_a_reader_leaves_a_save_in_flight_alone(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The run's own save of step 2 is held in its background write until another manager has opened the
    directory; it then completes and is listed."""
    release = threading.Event()
    original = json_checkpoint_handler.JsonCheckpointHandler._save_fn

    async def held(self, x, directory):  # a large checkpoint whose write takes a while
        if "/2." in str(directory):
            while not release.is_set():
                await asyncio.sleep(0.01)
        return await original(self, x, directory)

    monkeypatch.setattr(json_checkpoint_handler.JsonCheckpointHandler, "_save_fn", held)
    with CheckpointManager(tmp_path, owner=True) as run:
        assert _save(run, 1)
        run.wait_until_finished()
        assert _save(run, 2)
        try:
            assert _eventually(lambda: any(path.name.startswith("2.") for path in tmp_path.iterdir()))  # in flight
            with CheckpointManager(tmp_path, read_only=True) as reader:
                assert reader.all_steps() == [1]
                assert reader.read_data_state(1) == {"step": 1}
                assert not _save(reader, 3)  # a reader writes nothing either
        finally:
            release.set()
        run.wait_until_finished()
        assert run.all_steps() == [1, 2]


def test_the_run_manager_cleans_a_crashed_runs_leftovers(tmp_path: Path) -> None:
    """The run holding the output_dir lock removes the temporary directories a crashed run left."""
    (tmp_path / "7.orbax-checkpoint-tmp" / "state").mkdir(parents=True)
    for reader in (CheckpointManager(tmp_path), CheckpointManager(tmp_path, read_only=True)):
        reader.close()
    assert (tmp_path / "7.orbax-checkpoint-tmp").exists()
    with CheckpointManager(tmp_path, owner=True) as run:
        assert _save(run, 1)  # Orbax finishes its cleanup before the first save
        run.wait_until_finished()
    assert not (tmp_path / "7.orbax-checkpoint-tmp").exists()


def test_a_vanished_checkpoint_is_reported_with_the_steps_there_now(tmp_path: Path) -> None:
    """A resume whose checkpoint a live run's retention removed meanwhile names the newer steps, not 'no earlier
    checkpoint exists; start a new output_dir'."""
    error = resume_read_error(tmp_path, 150, [160, 170], FileNotFoundError("missing .zarray"))
    message = str(error)
    assert "start a new output_dir" not in message
    assert "160, 170" in message and "still writing" in message
