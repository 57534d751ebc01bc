"""The checkpoint of step N holds every callback's state after all of step N's hooks (`on_step_end` included), so a
run resumed there counts on exactly as one that never stopped: after a SIGTERM, a callback's stop or a larger
max_steps."""

import os
import signal
from pathlib import Path

import pytest

from easytrain import BaseTrainer, Callback
from easytrain.checkpoint import CheckpointManager
from easytrain.trainers.preemption import TrainingPreempted
from runs import StopAt
from signal_callbacks import SigtermAt
from test_trainer import tiny_args


class Counter(Callback):
    """Counts the steps it saw end; its count is its checkpointed progress."""

    def __init__(self) -> None:
        self.n = 0
        self.events: list[str] = []

    def on_step_end(self, trainer, step) -> None:
        self.n += 1
        self.events.append(f"step:{step}")

    def on_log(self, trainer, step, logs) -> None:
        self.events.append(f"log:{step}")

    def on_evaluate(self, trainer, step, metrics) -> None:
        self.events.append(f"evaluate:{step}")

    def on_save(self, trainer, step, checkpoint_dir) -> None:
        self.events.append(f"save:{step}")

    def state_dict(self) -> dict:
        return {"n": self.n}

    def load_state_dict(self, state) -> None:
        self.n = state["n"]


def saved_counts(output_dir: str) -> dict[int, int]:
    """The Counter state stored in each checkpoint of the run in `output_dir`."""
    with CheckpointManager(Path(output_dir) / "checkpoints", read_only=True) as manager:
        return {step: manager.read_progress(step)["callbacks"]["0:Counter"]["n"] for step in manager.all_steps()}


def args(path: Path, **overrides):
    values = dict(max_steps=6, save_strategy="steps", save_steps=3, logging_steps=2)
    return tiny_args(path, **{**values, **overrides})


@pytest.mark.parametrize("eval_strategy", ["no", "steps"])
def test_the_checkpoint_of_a_step_holds_the_state_after_its_on_step_end(tmp_path, eval_strategy):
    counter = Counter()
    arguments = args(tmp_path, eval_strategy=eval_strategy, eval_steps=3)
    BaseTrainer(arguments, callbacks=[counter]).train()
    assert saved_counts(arguments.output_dir) == {3: 3, 6: 6}
    evaluated = ["evaluate:3"] if eval_strategy == "steps" else []
    at_three = [event for event in counter.events if event.endswith(":3")]
    assert at_three == ["log:3", *evaluated, "step:3", "save:3"], "on_save comes after every other hook of its step"


@pytest.mark.parametrize("stop_at", [3, 4])  # a step saved anyway, and one saved for the signal only
def test_a_sigterm_resume_counts_as_an_unbroken_run(tmp_path, stop_at):
    unbroken = Counter()
    BaseTrainer(args(tmp_path / "straight", max_steps=8), callbacks=[unbroken]).train()
    with pytest.raises(TrainingPreempted):
        BaseTrainer(args(tmp_path / "cut", max_steps=8), callbacks=[Counter(), SigtermAt(stop_at)]).train()
    assert saved_counts(str(tmp_path / "cut" / "run")) == ({3: 3, 4: 4} if stop_at == 4 else {3: 3})
    resumed = Counter()
    BaseTrainer(args(tmp_path / "cut", max_steps=8, resume_from_checkpoint="latest"), callbacks=[resumed]).train()
    assert resumed.n == unbroken.n == 8


class SigtermWhileEvaluating(Callback):
    """Sends this process SIGTERM during the evaluation of `step`, before its `on_step_end`, as a scheduler's may."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_evaluate(self, trainer, step, metrics) -> None:
        if step == self.step:
            os.kill(os.getpid(), signal.SIGTERM)


def test_a_sigterm_before_on_step_end_is_checkpointed_after_that_hook(tmp_path):
    """The stop for a signal is checked after the step's every hook: a SIGTERM during step 4's evaluation still lets
    its `on_step_end` run, so the signal's checkpoint of step 4 holds 4 step ends, as a resume there expects."""
    with pytest.raises(TrainingPreempted):
        BaseTrainer(args(tmp_path, max_steps=8, eval_strategy="steps", eval_steps=4, max_eval_samples=8),
                    callbacks=[Counter(), SigtermWhileEvaluating(4)]).train()
    assert saved_counts(str(tmp_path / "run")) == {3: 3, 4: 4}


def test_a_max_steps_resume_counts_as_an_unbroken_run(tmp_path):
    unbroken = Counter()
    BaseTrainer(args(tmp_path / "straight", max_steps=12), callbacks=[unbroken]).train()
    BaseTrainer(args(tmp_path / "cut", max_steps=6), callbacks=[Counter()]).train()
    resumed = Counter()
    BaseTrainer(args(tmp_path / "cut", max_steps=12, resume_from_checkpoint="latest"), callbacks=[resumed]).train()
    assert resumed.n == unbroken.n == 12
    assert saved_counts(str(tmp_path / "cut" / "run")) == {6: 6, 9: 9, 12: 12}  # save_total_limit 3


def test_a_stop_requested_in_on_step_end_of_a_saved_step_is_in_its_checkpoint(tmp_path):
    arguments = args(tmp_path, max_steps=12)
    BaseTrainer(arguments, callbacks=[Counter(), StopAt(3)]).train()
    assert saved_counts(arguments.output_dir) == {3: 3}
