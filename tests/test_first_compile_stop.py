"""A stop signal while a fresh run compiles its first step: the run stops before step 1 (exit status 75, `job.json`
`stopped`), as a signal during the rest of its set-up does, so a compile longer than the grace window loses
nothing; both reruns (the same command line, and `--config <output_dir>/arguments.json`) then start it cleanly."""

import os
import signal
from pathlib import Path

import pytest

from easytrain import BaseTrainer, TrainingArguments
from easytrain.checkpoint import finalized_steps
from easytrain.cli import main
from easytrain.jobs import read_job
from easytrain.trainers.preemption import PREEMPTED_EXIT_CODE, TrainingPreempted
from easytrain.trainers.run_dir import check_output_dir

from runs import logged

FLAGS = dict(max_length=16, train_batch_size=4, eval_batch_size=4, logging_steps=1, eval_strategy="no",
             save_strategy="steps", save_steps=2, report_to=["jsonl", "csv"], disable_progress_bar=True,
             save_pretrained_at_end=False, max_train_samples=64, max_eval_samples=8, max_steps=2)


def tiny_args(output_dir: Path, **overrides) -> TrainingArguments:
    return TrainingArguments(**{**FLAGS, "output_dir": str(output_dir), **overrides})


class SignalWhileCompiling(BaseTrainer):
    """`sig` arrives while the first train step compiles (after the set-up: the output_dir is claimed, the logs
    opened)."""

    sig = signal.SIGTERM

    def plan_memory(self, state, batch):
        assert signal.getsignal(self.sig) not in (signal.SIG_DFL, signal.default_int_handler), "nothing catches it"
        os.kill(os.getpid(), self.sig)
        return super().plan_memory(state, batch)


@pytest.fixture(autouse=True)
def python_ctrl_c():
    """Python's own SIGINT handler, as in a user's process: pytest-xdist's workers ignore SIGINT (SIG_IGN)."""
    before = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, before)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_fresh_run_signalled_while_compiling_stops_before_step_one(tmp_path: Path, sig) -> None:
    output_dir = tmp_path / "run"
    args = tiny_args(output_dir)
    trainer = type("Signalled", (SignalWhileCompiling,), {"sig": sig})(args)
    with pytest.raises(TrainingPreempted) as stopped:
        trainer.train()
    assert (stopped.value.code, stopped.value.step, stopped.value.checkpoint) == (PREEMPTED_EXIT_CODE, 0, None)
    assert (f"stopped by {sig.name} while compiling the train step, before step 1: nothing trained; no checkpoint"
            in str(stopped.value))
    assert int(trainer.state.step) == 0, "no step ran"
    assert not finalized_steps(output_dir / "checkpoints"), "nothing was checkpointed"
    record = read_job(output_dir)
    assert (record["status"], record["error"]) == ("stopped", None) and sig.name in record["stop_reason"]
    assert not (output_dir / "metrics.jsonl").exists() and not (output_dir / "metrics.csv").exists(), (
        "the logs it opened hold nothing: a rerun would take them for another run's")
    assert check_output_dir(args) is None, "the same command line starts afresh in output_dir"


def test_both_reruns_of_a_run_stopped_while_compiling_train_it_from_step_one(tmp_path: Path) -> None:
    first, second = tmp_path / "config", tmp_path / "same"
    for output_dir in (first, second):
        with pytest.raises(TrainingPreempted):
            SignalWhileCompiling(tiny_args(output_dir)).train()
    # The file names the class that ran (this module's SignalWhileCompiling, importable): rerun as the plain task.
    assert main(["train", "--config", str(first / "arguments.json"), "--task", "lm"]) == 0
    BaseTrainer(tiny_args(second)).train()
    for output_dir in (first, second):
        assert sorted(logged(output_dir)) == [1, 2], "every step logged once"
        assert finalized_steps(output_dir / "checkpoints") == [2]
        assert read_job(output_dir)["status"] == "completed"


class FailsToCompile(BaseTrainer):
    """The first train step fails while it is built (an out-of-memory plan, a bug in the loss): nothing trained."""

    def plan_memory(self, state, batch):
        raise MemoryError("the step does not fit")


def test_a_fresh_run_that_fails_before_step_one_can_be_run_again_with_the_same_command(tmp_path):
    """Its empty logs would make the same command refuse output_dir as another run's; a run that trained nothing
    leaves none (job.json keeps its failure)."""
    with pytest.raises(MemoryError):
        FailsToCompile(tiny_args(tmp_path)).train()
    assert read_job(tmp_path)["status"] == "failed"
    BaseTrainer(tiny_args(tmp_path)).train()
    assert sorted(logged(tmp_path)) == [1, 2]
