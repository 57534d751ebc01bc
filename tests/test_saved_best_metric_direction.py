"""A `greater_is_better` that easytrain inferred from the metric's name is saved unset (null) in `arguments.json`,
so the file reused as a `--config` with another `metric_for_best_model` infers that metric's direction instead of
ranking it by the old one's (eval_loss's `false` made an accuracy pick its worst checkpoint). A direction given is
saved as given; the run itself, and every checkpoint's run_info, rank by the resolved direction as before. An
explicit direction that contradicts what the metric's name plainly says is warned about."""

from __future__ import annotations

import json
import logging

import pytest

from easytrain import BaseTrainer, TrainingArguments, best_metric_direction
from easytrain.config_io import load_arguments, parse_task_arguments, save_arguments
from easytrain.trainers.resume import check_resumable
from easytrain.trainers.run_dir import rerun_arguments
from metric_direction_arguments import arguments


def saved_direction(args: TrainingArguments, directory) -> object:
    return json.loads(save_arguments(rerun_arguments(args), directory).read_text())["greater_is_better"]


@pytest.mark.parametrize("given", [dict(), dict(metric_for_best_model="eval_loss"),
                                   dict(metric_for_best_model="accuracy"), dict(early_stopping_patience=2)])
def test_an_inferred_direction_is_saved_unset(tmp_path, given) -> None:
    args = arguments(tmp_path, **given)
    assert args.greater_is_better is not None  # the run itself ranks by the resolved direction
    assert saved_direction(args, tmp_path / "saved") is None


@pytest.mark.parametrize("explicit", [True, False])
def test_a_given_direction_is_saved_as_given(tmp_path, explicit) -> None:
    args = arguments(tmp_path, metric_for_best_model="eval_accuracy", greater_is_better=explicit)
    assert saved_direction(args, tmp_path / "saved") is explicit


def test_a_direction_set_after_inference_counts_as_given(tmp_path) -> None:
    args = arguments(tmp_path, metric_for_best_model="eval_my_score")
    args.greater_is_better = False  # changed in Python after the checks inferred True
    assert saved_direction(args, tmp_path / "saved") is False


def test_the_rerun_copy_keeps_the_resolved_direction_in_memory(tmp_path) -> None:
    args = arguments(tmp_path, metric_for_best_model="eval_loss")
    rerun = rerun_arguments(args)
    assert rerun.greater_is_better is False and rerun.resume_from_checkpoint == "latest"
    assert load_arguments(save_arguments(rerun, tmp_path / "saved")).greater_is_better is False


def test_a_runs_arguments_reused_with_another_metric_rank_by_that_metric(tmp_path) -> None:
    """The run's own arguments.json (eval_loss ranked lower-is-better), reused with --metric_for_best_model accuracy:
    higher accuracy is better, as without --config."""
    BaseTrainer(arguments(tmp_path / "first", early_stopping_patience=2)).save_arguments()
    config = tmp_path / "first" / "arguments.json"
    assert json.loads(config.read_text())["greater_is_better"] is None
    command = ["--config", str(config), "--output_dir", str(tmp_path / "second"), "--metric_for_best_model",
               "accuracy", "--load_best_model_at_end", "--save_strategy", "steps", "--save_steps", "2"]
    args, _ = parse_task_arguments(command, (), "lm")
    assert args.metric_for_best_model == "eval_accuracy" and args.greater_is_better is True


def test_each_checkpoint_still_records_the_resolved_direction(tmp_path) -> None:
    trainer = BaseTrainer(arguments(tmp_path, metric_for_best_model="eval_loss"))
    assert trainer._arguments.to_dict()["greater_is_better"] is False  # what run_info stores and resumes compare


@pytest.mark.parametrize(("metric", "explicit"), [("eval_loss", True), ("eval_perplexity", True),
                                                  ("eval_accuracy", False), ("exact_match", False),
                                                  ("eval_bits_per_byte", True)])
def test_a_direction_against_the_metric_name_is_warned_about(tmp_path, caplog, metric, explicit) -> None:
    best_metric_direction._warn_contradicted_direction.cache_clear()  # once per process: earlier tests may have warned
    with caplog.at_level(logging.WARNING, logger="easytrain"):
        arguments(tmp_path, metric_for_best_model=metric, greater_is_better=explicit)
    assert "greater_is_better" in caplog.text and f"--greater_is_better {str(not explicit).lower()}" in caplog.text


@pytest.mark.parametrize(("metric", "explicit"), [("eval_loss", False), ("eval_accuracy", True),
                                                  ("eval_my_score", False), ("eval_my_score", True)])
def test_a_direction_the_name_does_not_contradict_is_not_warned_about(tmp_path, caplog, metric, explicit) -> None:
    best_metric_direction._warn_contradicted_direction.cache_clear()
    with caplog.at_level(logging.WARNING, logger="easytrain"):
        arguments(tmp_path, metric_for_best_model=metric, greater_is_better=explicit)
    assert "greater_is_better" not in caplog.text


def resume_warnings(caplog, stored: dict, current: dict) -> list[str]:
    """The warnings `check_resumable` logs for a checkpoint of `stored` arguments resumed with `current`."""
    with caplog.at_level(logging.WARNING, logger="easytrain"):
        assert check_resumable({"format_version": 1, "arguments": stored, "model_config": None},
                               {"arguments": current, "model_config": None}) == []
    return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]


def test_a_resume_ranking_the_metric_the_other_way_is_warned_about(tmp_path, caplog) -> None:
    """A run of eval_ppl whose checkpoints recorded greater_is_better=True (inferred so before ppl was known as
    lower-is-better) resumed with the direction unset ranks lower-is-better: retention then re-ranks its kept
    checkpoints and removes the one kept as best so far. The resume says so, naming the field and the old value."""
    current = arguments(tmp_path, metric_for_best_model="eval_ppl").to_dict()
    assert current["greater_is_better"] is False
    warned = [m for m in resume_warnings(caplog, {**current, "greater_is_better": True}, current)
              if "greater_is_better" in m]
    assert len(warned) == 1 and "eval_ppl" in warned[0] and "--greater_is_better true" in warned[0], warned


def test_a_resume_ranking_as_before_is_not_warned_about(tmp_path, caplog) -> None:
    current = arguments(tmp_path, metric_for_best_model="eval_ppl").to_dict()
    assert not [m for m in resume_warnings(caplog, dict(current), current) if "greater_is_better" in m]
