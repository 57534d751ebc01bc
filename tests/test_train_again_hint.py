"""A second `train()` on a trainer is refused with what to do instead: a run that stopped early (a stop signal, a
failing callback) resumes with `resume_from_checkpoint='latest'` as it is; only one that reached its last step
needs a larger `max_steps` too."""

import pytest

from easytrain import BaseTrainer
from easytrain.errors import TrainedAlreadyError
from runs import FailAt, args_for


def test_a_run_stopped_before_its_end_is_not_told_to_raise_max_steps(tmp_path):
    trainer = BaseTrainer(args_for(tmp_path / "run", save_strategy="no"), callbacks=[FailAt(2)])
    with pytest.raises(RuntimeError, match="a failing callback"):
        trainer.train()
    with pytest.raises(TrainedAlreadyError) as refused:
        trainer.train()
    message = str(refused.value)
    assert "resume_from_checkpoint='latest'" in message and "step 2 of 4" in message
    assert "max_steps" not in message


def test_a_finished_run_is_told_to_raise_max_steps(tmp_path):
    trainer = BaseTrainer(args_for(tmp_path / "run", save_strategy="no"))
    trainer.train()
    with pytest.raises(TrainedAlreadyError, match="resume_from_checkpoint='latest' and a larger max_steps"):
        trainer.train()
