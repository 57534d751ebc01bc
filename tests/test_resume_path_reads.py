"""What the resume path reads before it decides: the checkpoints directory listed once when a trainer resumes
`latest`, and a damaged JSON item refused by the public `CheckpointManager.restore` before any array is read (on a
network filesystem each listing is a round trip; an array read of a damaged checkpoint is time spent for a refusal)."""

from __future__ import annotations

import pytest

from easytrain import BaseTrainer
from easytrain.checkpoint import CheckpointManager
from easytrain.errors import CheckpointReadError
from easytrain.trainers.run_dir import check_output_dir
from runs import args_for
from test_checkpoint_work import scans  # noqa: F401 (the fixture: each listing of a checkpoints directory)


def test_checking_a_resume_of_latest_lists_the_checkpoints_once(run_copy, scans):  # noqa: F811
    """Measured before: twice (whether the run stopped before its first checkpoint, then the latest step)."""
    assert check_output_dir(args_for(run_copy, max_steps=6, resume_from_checkpoint="latest"))[1] == 4
    assert len(scans) == 1, scans


def test_a_lora_trainer_resuming_latest_with_init_weights_from_lists_the_checkpoints_once(run_copy, scans):  # noqa: F811
    """`init_weights_from` is compared with a fresh start only, so the trainer asks whether it resumes. Measured
    before: three listings when it is built (twice in `adapters._resumes`, then `check_output_dir`)."""
    source = str(run_copy / "checkpoints" / "2")
    trainer = BaseTrainer(args_for(run_copy, max_steps=6, resume_from_checkpoint="latest", lora_rank=4,
                                   init_weights_from=source))
    assert trainer._resume_from[1] == 4 and len(scans) == 1, scans


def test_latest_over_a_run_stopped_before_its_first_checkpoint_still_starts_over(run_copy):
    """`restarts_unsaved_run`: an arguments.json and no complete checkpoint is a run to start over, not an error."""
    for step in ("2", "4"):  # as saves killed before they finished
        (run_copy / "checkpoints" / step).rename(run_copy / "checkpoints" / f"{step}.orbax-checkpoint-tmp-1")
    assert check_output_dir(args_for(run_copy, max_steps=6, resume_from_checkpoint="latest")) is None


def test_restore_refuses_a_damaged_data_state_before_reading_any_array(run_copy, monkeypatch):
    """Measured before: the state's arrays were restored (and fingerprinted), then the data_state failed, with the
    JSON decoder's own error (naming no checkpoint and no file)."""
    path = run_copy / "checkpoints" / "4" / "data_state" / "metadata"
    path.write_text("xx\n")
    restored = []
    monkeypatch.setattr(CheckpointManager, "restore_state",
                        lambda self, step, *, abstract_state: restored.append(step))
    with CheckpointManager(run_copy / "checkpoints", read_only=True) as manager:
        with pytest.raises(CheckpointReadError, match=rf"CheckpointManager.restore: the checkpoint "
                                                      rf"{run_copy / 'checkpoints' / '4'} cannot be read "
                                                      rf"\(JSONDecodeError: {path} is not valid JSON.*step 2\."):
            manager.restore(4, abstract_state=None)
    assert restored == []


def test_a_damaged_data_state_is_still_the_value_error_restore_raised_before(run_copy):
    """`restore` raised the JSON decoder's `ValueError` for a damaged data_state before it named the checkpoint;
    code around it that catches `ValueError` must still catch the named error (as it catches an `OSError`)."""
    (run_copy / "checkpoints" / "4" / "data_state" / "metadata").write_text("xx\n")
    with CheckpointManager(run_copy / "checkpoints", read_only=True) as manager:
        with pytest.raises(ValueError) as caught:
            manager.restore(4, abstract_state=None)
    assert isinstance(caught.value, (CheckpointReadError, OSError))
