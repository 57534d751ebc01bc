"""`metric_for_best_model` with `save_total_limit` keeps the best checkpoint only if checkpoints are saved where
evaluations ran: saves off the evaluation cadence are refused (warned about where the metric also stops early)."""

from __future__ import annotations

import logging

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
