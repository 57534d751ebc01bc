"""`metric_for_best_model` with `save_total_limit` keeps the best checkpoint only if checkpoints are saved where
evaluations ran: saves off the evaluation cadence are refused (warned about where the metric also stops early)."""

from __future__ import annotations

import logging
import re

import pytest

from easytrain import TrainingArguments
from easytrain.errors import ArgumentError


def ranked(tmp_path, **overrides) -> TrainingArguments:
    values = dict(output_dir=str(tmp_path), metric_for_best_model="eval_loss", save_total_limit=1,
                  eval_strategy="steps", save_strategy="steps", eval_steps=3, save_steps=4)
    return TrainingArguments(**(values | overrides))


def test_saves_off_the_evaluation_steps_are_refused(tmp_path) -> None:
    with pytest.raises(ArgumentError, match=r"save_steps: .*eval_steps=3") as refused:
        ranked(tmp_path)
    assert refused.value.field == "save_steps"


def test_an_epoch_save_with_step_evaluations_is_refused(tmp_path) -> None:
    with pytest.raises(ArgumentError, match="eval_strategy"):
        ranked(tmp_path, save_strategy="epoch")


@pytest.mark.parametrize("fine", [dict(save_steps=6), dict(save_total_limit=None), dict(save_strategy="no"),
                                  dict(metric_for_best_model=None)])
def test_saves_on_the_evaluation_steps_are_fine(tmp_path, fine) -> None:
    ranked(tmp_path, **fine)


def test_with_early_stopping_the_metric_may_rank_nothing_it_warns(tmp_path, caplog) -> None:
    with caplog.at_level(logging.WARNING, logger="easytrain"):
        ranked(tmp_path, early_stopping_patience=2)
    assert "save_steps" in caplog.text and "eval_steps=3" in caplog.text


def test_the_default_save_total_limit_is_named_and_the_flag_that_lifts_it_works(tmp_path) -> None:
    """save_total_limit defaults to 3: a user who never set it is told so, and given a flag the command accepts."""
    from easytrain.config_io import parse_task_arguments

    command = ["--output_dir", str(tmp_path), "--metric_for_best_model", "eval_loss", "--eval_strategy", "steps",
               "--eval_steps", "300", "--save_steps", "500"]
    with pytest.raises(ArgumentError) as refused:
        parse_task_arguments(command, (), "lm")
    message = str(refused.value)
    assert "save_total_limit=3 (the default)" in message, message
    lift = re.search(r"--save_total_limit ([^\s,;.)]+)", message)
    assert lift, message
    arguments, _ = parse_task_arguments([*command, "--save_total_limit", lift.group(1)], (), "lm")
    assert arguments.save_total_limit is None


@pytest.mark.parametrize("overrides", [dict(), dict(save_strategy="epoch")])
def test_load_best_model_at_end_names_the_same_field_and_fix(tmp_path, overrides) -> None:
    """One rule (`checkpoints_off_evaluations`) for both checks: the same field, the same fix."""
    with pytest.raises(ArgumentError) as kept:
        ranked(tmp_path, **overrides)
    with pytest.raises(ArgumentError) as loaded:
        ranked(tmp_path, save_total_limit=None, load_best_model_at_end=True, **overrides)
    assert kept.value.field == loaded.value.field
    fix = str(loaded.value).rsplit(": ", 1)[-1].rstrip(".")
    assert fix in str(kept.value), (fix, str(kept.value))
