"""`task_settings()` values go through JSON (each checkpoint's run_info) and a resume compares the decoded ones with
the live ones: a value JSON changes (a tuple, an int dict key) is recorded and compared in its JSON form, so the
resume goes on; one JSON cannot hold (a path, NaN, infinity) is refused by name with its fix at set-up, before
any data or model work, not at the first save (a path) or on every resume (NaN is never equal to itself)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from easytrain import ArgumentError, BaseTrainer, TrainingArguments
from easytrain.trainers.run_record import merged_task_settings


def tiny_args(output_dir, **overrides) -> TrainingArguments:
    values = dict(output_dir=str(output_dir), max_length=16, train_batch_size=8, max_steps=2, logging_steps=1,
                  eval_strategy="no", save_strategy="steps", save_steps=2, report_to=["none"],
                  disable_progress_bar=True, save_pretrained_at_end=False, max_train_samples=32)
    return TrainingArguments(**(values | overrides))


def trainer_with(value):
    class WithSetting(BaseTrainer):
        def task_settings(self):
            return {"setting": value}

    return WithSetting


@pytest.mark.parametrize("value, recorded", [((1, 2), [1, 2]), ({1: "a"}, {"1": "a"})], ids=["tuple", "int_key"])
def test_a_value_json_changes_is_recorded_in_its_json_form_and_resumes(tmp_path, value, recorded):
    trainer_cls = trainer_with(value)
    first = trainer_cls(tiny_args(tmp_path))
    first.train()
    assert first.run_info()["task_arguments"] == {"setting": recorded}
    resumed = trainer_cls(tiny_args(tmp_path, max_steps=3, resume_from_checkpoint="latest"))
    resumed.train()
    assert int(resumed.state.step) == 3


@pytest.mark.parametrize("value, fix", [(Path("runs/teacher_a"), "str("), (float("nan"), "None"),
                                        (math.inf, "None"), ({"inner": {1, 2}}, "list")],
                         ids=["path", "nan", "inf", "nested_set"])
def test_a_value_json_cannot_hold_is_refused_by_name_at_set_up(tmp_path, value, fix):
    trainer = trainer_with(value)(tiny_args(tmp_path / "run"))
    with pytest.raises(ArgumentError, match="task_settings") as refused:
        trainer.setup()
    message = str(refused.value)
    assert "'setting'" in message and "WithSetting" in message and fix in message, message
    assert trainer._data is None and trainer._model is None  # before any data or model work
    assert not any((tmp_path / "run").iterdir())  # nothing written


def test_the_merged_settings_are_json_values():
    class Parent:
        def task_settings(self):
            return {"order": ("b", "a")}

    class Child(Parent):
        def task_settings(self):
            return {"by_id": {3: 1.5}}

    merged = merged_task_settings(Child())
    assert merged == {"order": ["b", "a"], "by_id": {"3": 1.5}}
    assert json.loads(json.dumps(merged)) == merged
