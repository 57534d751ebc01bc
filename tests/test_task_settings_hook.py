"""`task_settings()`: each trainer class adds the settings a resume must keep, and `run_info()['task_arguments']`
holds every class's of the chain, so a subclass of SFTTrainer adding its own cannot drop SFT's packing and masking
settings (a resume under another `completion_only_loss` stays refused) and its own are refused too."""

from __future__ import annotations

import pytest

from easytrain import ArgumentError, BaseTrainer, TrainingArguments
from easytrain.trainers.sft import SFTArguments, SFTTrainer

SFT_SETTINGS = ("packing", "packing_strategy", "completion_only_loss", "assistant_only_loss", "truncation_side",
                "chat_template_path")  # what every SFT checkpoint records, in this order's values


class WithTeacher(SFTTrainer):
    """Records its own setting and does not call super(): SFT's settings must be recorded all the same."""

    teacher_seed = 123

    def task_settings(self):
        return {"teacher_seed": self.teacher_seed}


def tiny_args(output_dir, **overrides) -> TrainingArguments:
    values = dict(output_dir=str(output_dir), max_length=16, train_batch_size=8, max_steps=2, logging_steps=1,
                  eval_strategy="no", save_strategy="steps", save_steps=2, report_to=["none"],
                  disable_progress_bar=True, save_pretrained_at_end=False, max_train_samples=32)
    return TrainingArguments(**(values | overrides))


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A WithTeacher run checkpointed at step 2, and the trainer that wrote it."""
    output_dir = tmp_path_factory.mktemp("teacher")
    trainer = WithTeacher(tiny_args(output_dir), SFTArguments())
    trainer.train()
    return output_dir, trainer


def test_the_record_holds_sfts_settings_as_before_and_the_subclass_own(trained):
    _, trainer = trained
    sft = SFTArguments()
    assert trainer.run_info()["task_arguments"] == {**{name: getattr(sft, name) for name in SFT_SETTINGS},
                                                    "teacher_seed": 123}


def test_a_changed_completion_only_loss_is_still_refused(trained):
    output_dir, _ = trained
    resumed = WithTeacher(tiny_args(output_dir, max_steps=4, resume_from_checkpoint="latest"),
                          SFTArguments(completion_only_loss=False))
    with pytest.raises(ArgumentError, match="completion_only_loss: checkpoint True vs now False"):
        resumed.setup()


def test_a_changed_setting_of_the_subclass_is_refused(trained):
    output_dir, _ = trained
    resumed = WithTeacher(tiny_args(output_dir, max_steps=4, resume_from_checkpoint="latest"), SFTArguments())
    resumed.teacher_seed = 7
    with pytest.raises(ArgumentError, match="teacher_seed: checkpoint 123 vs now 7"):
        resumed.setup()


def test_settings_merge_base_first_whether_or_not_an_override_calls_super():
    from easytrain.trainers.run_record import merged_task_settings

    class Parent:
        def task_settings(self):
            return {"a": 1, "shared": "parent"}

    class Forgets(Parent):
        def task_settings(self):
            return {"b": 2, "shared": "child"}

    class Calls(Forgets):
        def task_settings(self):
            return {**super().task_settings(), "c": 3}

    class Adds(Calls):  # no override of its own
        pass

    assert merged_task_settings(Forgets()) == {"a": 1, "b": 2, "shared": "child"}
    assert merged_task_settings(Adds()) == {"a": 1, "b": 2, "c": 3, "shared": "child"}


def test_a_trainer_without_settings_records_no_task_arguments(tmp_path):
    """As before: the base trainer's run_info has no `task_arguments` entry at all."""
    trainer = BaseTrainer(tiny_args(tmp_path, max_steps=1, save_strategy="no"))
    trainer.setup()
    assert "task_arguments" not in trainer.run_info()
