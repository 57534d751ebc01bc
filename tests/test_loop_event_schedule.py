"""When the loop evaluates, checkpoints and logs, in one 8-step run that ends inside its third epoch (24 rows, batch
8: 3 steps an epoch): epoch strategies act after each epoch's last step, not one step early or only at the end; the
final checkpoint, off the evaluations, carries no earlier step's eval metrics (they rank checkpoints); the last step,
off the logging cadence, logs before its `on_step_end` like every other logged step, not from the run's ending after it.
"""

import json
from pathlib import Path

import pytest

from easytrain import BaseTrainer
from easytrain.checkpoint import CheckpointManager
from test_trainer import Recorder, tiny_args


@pytest.fixture(scope="module")
def epoch_run(tmp_path_factory):
    """Evaluates and saves by epoch, logs every 3 steps, and stops at max_steps 8, two steps into epoch 3."""
    recorder = Recorder()
    args = tiny_args(tmp_path_factory.mktemp("epochs"), max_steps=8, max_train_samples=24, logging_steps=3,
                     eval_strategy="epoch", save_strategy="epoch", save_total_limit=None, max_eval_samples=8,
                     metric_for_best_model="eval_loss")
    BaseTrainer(args, callbacks=[recorder]).train()
    return args, recorder.events


def test_epoch_strategies_evaluate_and_save_after_each_epochs_last_step(epoch_run):
    args, events = epoch_run
    assert [event for event in events if event.split(":")[0] in ("evaluate", "save")] == \
        ["evaluate:3", "save:3", "evaluate:6", "save:6", "save:8"]
    with CheckpointManager(Path(args.output_dir) / "checkpoints", read_only=True) as manager:
        assert manager.all_steps() == [3, 6, 8]


def test_the_final_checkpoint_off_the_evaluations_carries_no_eval_metrics(epoch_run):
    """Checkpoints rank by the evaluation of their own step: step 8 holding step 6's eval_loss would rank as a model
    it is not (and be kept, or loaded at the end, as the best)."""
    args, _ = epoch_run
    stored = {step: Path(args.output_dir) / "checkpoints" / str(step) / "metrics" / "metrics" for step in (6, 8)}
    assert "eval_loss" in json.loads(stored[6].read_text())
    assert not stored[8].exists() or "eval_loss" not in json.loads(stored[8].read_text())


def test_the_last_step_logs_before_its_on_step_end(epoch_run):
    """Step 8 is off the logging cadence (every 3) and not evaluated or saved when its hooks run: it logs at once, as
    the last step, and not from the final checkpoint after its `on_step_end`."""
    _, events = epoch_run
    assert events[-4:] == ["log:8", "step:8", "save:8", "train_end"]
