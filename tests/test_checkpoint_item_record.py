"""Each checkpoint records in its run_info which items it was saved with. An item lost together with its entry in
Orbax's `_CHECKPOINT_METADATA` (a partial copy or rsync, a hand clean-up) would otherwise read as a checkpoint
written before the item existed: resumed without its integrity check, or with its callbacks' progress reset.
Such a checkpoint is refused before any array is read and left untouched; one written before the record still
resumes as it did."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import pytest

from easytrain import BaseTrainer
from easytrain.checkpoint import CheckpointManager
from easytrain.checkpoint_items import RECORD_KEY, MissingItemError, present
from easytrain.errors import CheckpointReadError
from runs import args_for, snapshot
from test_resume_inputs import resume

OPTIONAL_ITEMS = ("fingerprint", "progress", "data_state")


def _lose(step_dir: Path, item: str) -> None:
    """Delete `item` and its entry in Orbax's metadata, as a copy that never had it would look."""
    shutil.rmtree(step_dir / item)
    metadata_file = step_dir / "_CHECKPOINT_METADATA"
    metadata = json.loads(metadata_file.read_text())
    del metadata["item_handlers"][item]
    metadata_file.write_text(json.dumps(metadata))


def _unrecord(step_dir: Path) -> None:
    """Remove the item record from run_info: a checkpoint as written before it existed."""
    run_info_file = step_dir / "run_info" / "metadata"
    run_info = json.loads(run_info_file.read_text())
    del run_info[RECORD_KEY]
    run_info_file.write_text(json.dumps(run_info))


@pytest.mark.parametrize("item", OPTIONAL_ITEMS)
def test_an_item_lost_with_its_metadata_entry_is_refused(run_copy, item):
    _lose(run_copy / "checkpoints" / "4", item)
    before = snapshot(run_copy)
    with pytest.raises(CheckpointReadError) as refused:
        resume(run_copy).setup()
    message = str(refused.value)
    assert snapshot(run_copy) == before, "nothing is deleted, moved or rewritten"
    assert f"checkpoint step 4: its {item}/ item is missing" in message, message
    assert "saved with" in message and "backup" in message, message
    assert "checkpoints there: 2, 4" in message and "--resume_from_checkpoint" in message, message


def test_every_saved_item_is_recorded_and_read_run_info_returns_what_was_saved(run_copy):
    run_info = json.loads((run_copy / "checkpoints" / "4" / "run_info" / "metadata").read_text())
    assert sorted(run_info[RECORD_KEY]) == ["data_state", "fingerprint", "progress", "run_info", "state"]
    with CheckpointManager(run_copy / "checkpoints", read_only=True) as manager:
        assert RECORD_KEY not in manager.read_run_info(4)


def test_a_damaged_record_is_refused(run_copy):
    run_info_file = run_copy / "checkpoints" / "4" / "run_info" / "metadata"
    run_info_file.write_text(json.dumps({**json.loads(run_info_file.read_text()), RECORD_KEY: "fingerprint"}))
    with pytest.raises(CheckpointReadError, match=r"step 4.*record of its items .* is damaged"):
        resume(run_copy).setup()


def test_a_checkpoint_written_before_the_record_resumes_as_before(run_copy, caplog):
    step_dir = run_copy / "checkpoints" / "4"
    _unrecord(step_dir)
    for item in ("fingerprint", "progress"):
        _lose(step_dir, item)
    trainer = BaseTrainer(args_for(run_copy, max_steps=6, resume_from_checkpoint="latest"))
    with caplog.at_level(logging.INFO, logger="easytrain"):
        trainer.setup()
    assert int(trainer.state.step) == 4 and trainer.resumed_data_state["step"] == 4
    assert "records no list of its items" in caplog.text


def test_the_manager_refuses_a_lost_fingerprint_outside_a_resume(tmp_path):
    """`load_best_model_at_end` restores through the manager alone, `--init_weights_from` checks the item itself: the
    record is checked there too."""
    state = {"w": jnp.arange(8.0)}
    with CheckpointManager(tmp_path, async_save=False) as manager:
        for step in (1, 2):
            manager.save(step, state=state, data_state={}, run_info={"format_version": 1}, force=True)
    _lose(tmp_path / "2", "fingerprint")
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)
    with CheckpointManager(tmp_path, read_only=True) as manager:
        with pytest.raises(MissingItemError, match=r"checkpoint step 2: its fingerprint/ item is missing.*there: 1, 2"):
            manager.restore(2, abstract_state=abstract)
        restored, _, run_info = manager.restore(1, abstract_state=abstract)
    with pytest.raises(MissingItemError, match=r"run_info's _checkpoint_items lists it"):  # --init_weights_from's check
        present(tmp_path / "2", "fingerprint")
    assert run_info == {"format_version": 1}
    assert jnp.array_equal(restored["w"], state["w"])
