"""Retention and `load_best_model_at_end` across a resume, as transformers' Trainer ranks: the best checkpoint is
never deleted, whatever `save_total_limit` (1 here) and however the run was interrupted; of equal values the
earliest is best (transformers replaces its best only on a strict improvement); the direction follows the metric's
name. And a callback that raises in `on_save` loses no checkpoint: the one it was told of is complete and resumes."""

from pathlib import Path

import pytest

from easytrain.checkpoint import CheckpointManager
from runs import FailAtSave, StopAt
from test_foundation import regression_trainer
from test_trainer import logged, tiny_args


def scored(scores: dict[int, float], name: str):
    """An evaluator giving each step its score, the same in a run and in its resume."""
    return lambda trainer: {name: scores[int(trainer.state.step)]}


def best_run_args(tmp_path, metric: str, **overrides):
    return tiny_args(tmp_path, max_steps=6, eval_strategy="steps", eval_steps=2, save_strategy="steps", save_steps=2,
                     save_total_limit=1, metric_for_best_model=metric, load_best_model_at_end=True,
                     max_eval_samples=8, **overrides)


@pytest.mark.parametrize(("metric", "scores", "best"), [
    ("accuracy", {2: 0.9, 4: 0.5, 6: 0.7}, 2),  # eval_accuracy: higher is better
    ("eval_error", {2: 0.3, 4: 0.3, 6: 0.5}, 2),  # lower is better; a tie: the earlier
    ("eval_error", {2: 0.5, 4: 0.1, 6: 0.3}, 4),  # the best saved in the run's second part
])
def test_the_best_checkpoint_survives_a_resume_under_a_limit_of_one_and_is_loaded(tmp_path, metric, scores, best):
    key = metric if metric.startswith("eval_") else f"eval_{metric}"
    interrupted = best_run_args(tmp_path, metric)
    regression_trainer(interrupted, evaluators=[scored(scores, key)], callbacks=[StopAt(4)]).train()
    kept_before = CheckpointManager(Path(interrupted.output_dir) / "checkpoints").all_steps()
    assert kept_before == sorted({min(best, 4), 4}), "the best so far and the newest, at the stop"
    resumed = regression_trainer(best_run_args(tmp_path, metric, resume_from_checkpoint="latest"),
                                 evaluators=[scored(scores, key)])
    logs = resumed.train()
    assert CheckpointManager(Path(interrupted.output_dir) / "checkpoints").all_steps() == sorted({best, 6})
    assert logs["best_step"] == best and int(resumed.state.step) == best


def test_a_callback_raising_in_on_save_loses_no_checkpoint(tmp_path):
    """save_total_limit 1: the raise comes after checkpoint 4 replaced checkpoint 2, so 4 must be whole. The run
    resumed from it logs what an uninterrupted run logs."""
    common = dict(max_steps=6, save_strategy="steps", save_steps=2, save_total_limit=1, learning_rate=1e-2)
    straight = tiny_args(tmp_path / "straight", **common)
    regression_trainer(straight).train()
    failed = tiny_args(tmp_path / "failed", **common)
    with pytest.raises(RuntimeError, match="a failing on_save at step 4"):
        regression_trainer(failed, callbacks=[FailAtSave(4)]).train()
    assert CheckpointManager(Path(failed.output_dir) / "checkpoints").all_steps() == [4]
    resumed = regression_trainer(tiny_args(tmp_path / "failed", resume_from_checkpoint="latest", **common))
    resumed.train()
    assert int(resumed.state.step) == 6
    assert logged(failed.output_dir) == logged(straight.output_dir)
