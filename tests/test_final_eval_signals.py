"""A stop signal after the last step, while `easytrain train` exports the model or evaluates it before writing
`results.json`: the command stops with exit status 75 and `job.json` `stopped`, as everywhere else, and the rerun its
message names (from the final checkpoint) trains nothing, evaluates and writes `results.json`."""

from __future__ import annotations

import logging
import re
import shlex
import signal
from pathlib import Path

import pytest

from easytrain.cli import main, run
from easytrain.jobs import read_job
from easytrain.trainers.preemption import PREEMPTED_EXIT_CODE, TrainingPreempted
from runs import args_for

FINAL_TASKS = '''
"""Trainers (`--task final_tasks:...`) sent a stop signal after their last step."""
import os
import logging
import signal

from easytrain import BaseTrainer


class SigtermInFinalEval(BaseTrainer):
    def evaluate(self, dataset=None):
        os.kill(os.getpid(), signal.SIGTERM)
        return super().evaluate(dataset)


class SigtermInFirstFinalEval(BaseTrainer):
    """Stopped in the final evaluation of its first run in a directory (a marker beside output_dir says so)."""
    def evaluate(self, dataset=None):
        marker = os.path.join(os.path.dirname(self.arguments.output_dir), "signalled")
        if not os.path.exists(marker):
            open(marker, "w").close()
            os.kill(os.getpid(), signal.SIGTERM)
        return super().evaluate(dataset)


class SigintInExport(BaseTrainer):
    def save_pretrained(self, path):
        os.kill(os.getpid(), signal.SIGINT)
        return super().save_pretrained(path)
'''


@pytest.fixture(autouse=True)
def final_tasks(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The module of `FINAL_TASKS` importable; SIGTERM and SIGINT only recorded outside easytrain's catch, so a
    signal the command no longer catches shows as a missing stop instead of ending the test process."""
    (tmp_path / "final_tasks.py").write_text(FINAL_TASKS)
    monkeypatch.syspath_prepend(str(tmp_path))
    uncaught: list[str] = []
    previous = {sig: signal.signal(sig, lambda signum, _: uncaught.append(signal.Signals(signum).name))
                for sig in (signal.SIGTERM, signal.SIGINT)}
    yield uncaught
    for sig, handler in previous.items():
        signal.signal(sig, handler)


def test_sigterm_in_the_final_evaluation_exits_75_and_a_rerun_finishes(run_copy: Path, final_tasks) -> None:
    with pytest.raises(TrainingPreempted) as stopped:
        run(args_for(run_copy, resume_from_checkpoint="latest", task="final_tasks:SigtermInFinalEval"))
    assert stopped.value.code == PREEMPTED_EXIT_CODE and "evaluat" in str(stopped.value)
    assert read_job(run_copy)["status"] == "stopped" and not (run_copy / "results.json").exists()
    assert final_tasks == []
    summary = run(args_for(run_copy, resume_from_checkpoint="latest"))
    assert "eval_loss" in summary and (run_copy / "results.json").exists()
    assert read_job(run_copy)["status"] == "completed"


FRESH = ["--max_length", "16", "--train_batch_size", "4", "--eval_batch_size", "4", "--max_steps", "2",
         "--max_train_samples", "32", "--max_eval_samples", "8", "--report_to", "jsonl", "--disable_progress_bar",
         "--save_pretrained_at_end", "false", "--task", "final_tasks:SigtermInFirstFinalEval"]


@pytest.mark.parametrize("save_strategy", ["steps", "no"])
def test_a_fresh_run_stopped_in_its_final_evaluation_finishes_when_rerun_as_its_message_says(
        tmp_path: Path, final_tasks, save_strategy: str) -> None:
    """The message names a command that works: the fresh command again would be refused (its checkpoints)."""
    command = ["--output_dir", str(tmp_path / "run"), "--save_strategy", save_strategy, *FRESH]
    with pytest.raises(TrainingPreempted) as stopped:
        main(["train", *command])
    assert stopped.value.code == PREEMPTED_EXIT_CODE and final_tasks == []
    message = str(stopped.value)
    rerun = re.search(r"`easytrain (train [^`]+)`", message)
    assert rerun, message
    assert main(shlex.split(rerun.group(1))) == 0
    assert (tmp_path / "run" / "results.json").exists() and read_job(tmp_path / "run")["status"] == "completed"


def test_sigint_in_the_final_export_exits_75(run_copy: Path, final_tasks) -> None:
    with pytest.raises(TrainingPreempted) as stopped:
        run(args_for(run_copy, resume_from_checkpoint="latest", save_pretrained_at_end=True,
                     task="final_tasks:SigintInExport"))
    assert stopped.value.code == PREEMPTED_EXIT_CODE and stopped.value.signal_name == "SIGINT"
    assert read_job(run_copy)["status"] == "stopped" and not (run_copy / "results.json").exists()
    assert final_tasks == []


def test_a_signal_in_the_export_of_a_train_call_is_reported_and_train_returns(run_copy: Path, final_tasks,
                                                                              caplog) -> None:
    """Outside the command, `train()` owns the catch: it finishes and says the signal came too late to stop it."""
    import final_tasks as tasks

    trainer = tasks.SigintInExport(args_for(run_copy, resume_from_checkpoint="latest", save_pretrained_at_end=True))
    with caplog.at_level(logging.WARNING, logger="easytrain"):
        trainer.train()
    assert "SIGINT came after the last step" in caplog.text and final_tasks == []
