"""DPO's loss options (beta, loss_type, loss_weights, label_smoothing, simpo_gamma, TR-DPO's) are recorded in
every checkpoint's run_info (`loss_settings`) and a resume under other values is warned about, naming each one, as
the optimizer's hyperparameters are: the restored state fits, the objective from there on is another (a researcher
may change beta on purpose). The options that decide the rows stay in `task_arguments`, refused as before, and a
checkpoint written before the loss options were recorded resumes without a word about them."""

from __future__ import annotations

import json
import logging
import shutil

import pytest

from easytrain import ArgumentError, TrainingArguments
from easytrain.trainers.dpo import DPOArguments, DPOTrainer
from easytrain.trainers.resume_checks import warn_changes

LOSS_SETTINGS_KEY = "loss_settings"  # the run_info entry, part of the checkpoint format
LOSS_WORDS = "other loss settings"


def tiny_args(output_dir, **overrides) -> TrainingArguments:
    values = dict(output_dir=str(output_dir), max_length=16, train_batch_size=8, eval_batch_size=8, max_steps=2,
                  learning_rate=1e-2, logging_steps=1, eval_strategy="no", save_strategy="steps", save_steps=2,
                  report_to=["none"], disable_progress_bar=True, save_pretrained_at_end=False, max_train_samples=32,
                  max_eval_samples=8)
    return TrainingArguments(**(values | overrides))


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A DPO run (beta 0.1, sigmoid) checkpointed at step 2, and the trainer that wrote it."""
    output_dir = tmp_path_factory.mktemp("dpo") / "run"
    trainer = DPOTrainer(tiny_args(output_dir), DPOArguments(beta=0.1))
    trainer.train()
    return output_dir, trainer


def resume(trained, tmp_path, dpo: DPOArguments, caplog, edit=None) -> tuple[DPOTrainer, list[str]]:
    """Resume a copy of the trained run to step 3 under `dpo`; the warnings about loss settings it logged."""
    output_dir = tmp_path / "run"
    shutil.copytree(trained[0], output_dir)
    if edit is not None:
        stored = output_dir / "checkpoints" / "2" / "run_info" / "metadata"
        stored.write_text(json.dumps(edit(json.loads(stored.read_text()))))
    trainer = DPOTrainer(tiny_args(output_dir, max_steps=3, resume_from_checkpoint="latest"), dpo)
    with caplog.at_level(logging.INFO, logger="easytrain"):
        trainer.train()
    assert int(trainer.state.step) == 3
    return trainer, [r.getMessage() for r in caplog.records if "loss settings" in r.getMessage()]


def test_the_checkpoint_records_the_loss_options_and_the_row_options_as_before(trained):
    info = trained[1].run_info()
    assert info[LOSS_SETTINGS_KEY] == {"beta": 0.1, "loss_type": ["sigmoid"], "loss_weights": [1.0],
                                       "label_smoothing": 0.0, "sync_ref_model": False}
    assert info["task_arguments"] == {"max_prompt_length": None, "disable_dropout": True}


def test_a_resume_under_another_beta_and_loss_is_warned_naming_each(trained, tmp_path, caplog):
    _, warned = resume(trained, tmp_path, DPOArguments(beta=5.0, loss_type=["hinge"]), caplog)
    assert len(warned) == 1 and LOSS_WORDS in warned[0], warned
    assert "beta: checkpoint 0.1 vs now 5.0" in warned[0]
    assert "loss_type: checkpoint ['sigmoid'] vs now ['hinge']" in warned[0]


def test_a_resume_under_the_same_loss_options_says_nothing_of_them(trained, tmp_path, caplog):
    assert resume(trained, tmp_path, DPOArguments(beta=0.1, loss_weights=[1.0]), caplog)[1] == []


def test_a_checkpoint_from_before_the_record_resumes_with_a_one_line_note(trained, tmp_path, caplog):
    def older(run_info):
        run_info.pop(LOSS_SETTINGS_KEY, None)
        return run_info

    _, noted = resume(trained, tmp_path, DPOArguments(beta=5.0), caplog, edit=older)
    assert len(noted) == 1 and "predates" in noted[0], noted
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING and "loss settings" in r.getMessage()]


def test_a_changed_max_prompt_length_is_still_refused(trained, tmp_path):
    output_dir = tmp_path / "run"
    shutil.copytree(trained[0], output_dir)
    resumed = DPOTrainer(tiny_args(output_dir, max_steps=3, resume_from_checkpoint="latest"),
                         DPOArguments(max_prompt_length=4))
    with pytest.raises(ArgumentError, match="max_prompt_length: checkpoint None vs now 4"):
        resumed.setup()


def test_options_no_chosen_loss_reads_are_not_compared(caplog):
    """simpo_gamma is simpo's, the mixup settings TR-DPO's: where a side does not run them they are not named."""
    arguments = {"seed": 1}
    stored = {"arguments": arguments, LOSS_SETTINGS_KEY: {"beta": 0.1, "loss_type": ["sigmoid"]}}
    current = {"arguments": arguments, LOSS_SETTINGS_KEY: {"beta": 0.1, "loss_type": ["simpo"], "simpo_gamma": 0.5}}
    with caplog.at_level(logging.WARNING, logger="easytrain"):
        warn_changes(stored, current)
    assert "loss_type" in caplog.text and "simpo_gamma" not in caplog.text
