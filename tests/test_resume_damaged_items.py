"""Damaged JSON items of a checkpoint (`fingerprint`, `progress`, `data_state`): each is refused before any compute,
naming the checkpoint and an earlier one to resume, and every checkpoint is left byte-for-byte untouched. A missing
item the checkpoint's metadata lists is damage, not an older checkpoint."""

import json
import re
import shutil
from pathlib import Path

import pytest

from easytrain import BaseTrainer
from easytrain.errors import CheckpointReadError
from runs import args_for, snapshot
from test_resume_inputs import resume

REFUSED = r"the checkpoint .*/4 cannot be read.*left untouched; resume from an earlier one.*checkpoints/2"


def _refused(run: Path, pattern: str) -> str:
    before = snapshot(run)
    with pytest.raises(CheckpointReadError, match=REFUSED) as refused:
        resume(run).setup()
    assert snapshot(run) == before, "nothing is deleted, moved or rewritten"
    assert re.search(pattern, str(refused.value)), str(refused.value)
    return str(refused.value)


@pytest.mark.parametrize("item", ["fingerprint", "progress"])
def test_a_deleted_item_the_metadata_lists_is_refused(run_copy, item):
    step_dir = run_copy / "checkpoints" / "4"
    shutil.rmtree(step_dir / item)  # without its fingerprint, damaged arrays would train (as NaN)
    _refused(run_copy, rf"{item}.*missing")


def test_an_emptied_fingerprint_is_refused(run_copy):
    step_dir = run_copy / "checkpoints" / "4"
    (step_dir / "fingerprint" / "metadata").write_text("{}")  # checks nothing, unless every array must be in it
    _refused(run_copy, r"fingerprint.*records no digest")


def test_a_checkpoint_written_before_fingerprints_still_resumes(run_copy):
    """An older checkpoint has neither item, its metadata lists neither, and its run_info records no items: resumed
    as before."""
    step_dir = run_copy / "checkpoints" / "4"
    metadata_file = step_dir / "_CHECKPOINT_METADATA"
    metadata = json.loads(metadata_file.read_text())
    for item in ("fingerprint", "progress"):
        shutil.rmtree(step_dir / item)
        del metadata["item_handlers"][item]
    metadata_file.write_text(json.dumps(metadata))
    run_info_file = step_dir / "run_info" / "metadata"
    run_info = json.loads(run_info_file.read_text())
    del run_info["_checkpoint_items"]
    run_info_file.write_text(json.dumps(run_info))
    trainer = BaseTrainer(args_for(run_copy, max_steps=6, resume_from_checkpoint="latest"))
    trainer.setup()
    assert int(trainer.state.step) == 4 and trainer.resumed_data_state["step"] == 4


def test_garbled_progress_names_the_file(run_copy):
    (run_copy / "checkpoints" / "4" / "progress" / "metadata").write_text("xx\n")
    message = _refused(run_copy, r"4/progress/metadata is not valid JSON")
    assert "StopIteration" not in message


@pytest.mark.parametrize("saved_step", [2, 5])
def test_a_data_position_of_another_step_is_refused(run_copy, saved_step):
    """A position of step 2 inside checkpoint 4 would feed batches 3-4 twice (and 5 would skip one)."""
    position_file = run_copy / "checkpoints" / "4" / "data_state" / "metadata"
    position = json.loads(position_file.read_text())
    position_file.write_text(json.dumps({**position, "step": saved_step}))
    _refused(run_copy, rf"data_state records step {saved_step}.*checkpoint of step 4")


def test_a_data_position_without_a_step_is_refused(run_copy):
    position_file = run_copy / "checkpoints" / "4" / "data_state" / "metadata"
    position = json.loads(position_file.read_text())
    del position["step"]
    position_file.write_text(json.dumps(position))
    _refused(run_copy, r"data_state records no step")


def test_a_restored_state_of_another_step_is_refused():
    """A step directory renamed or mixed up holds a state of another step; a loader of the trainer's own records
    no position to catch it, so the restored state's step is compared too."""
    import jax.numpy as jnp
    from types import SimpleNamespace

    from easytrain.trainers.resume import check_restored_step

    check_restored_step(SimpleNamespace(step=jnp.asarray(4)), 4)
    with pytest.raises(ValueError, match=r"train state is at step 3, but this is the checkpoint of step 4"):
        check_restored_step(SimpleNamespace(step=jnp.asarray(3)), 4)
