"""Job reporting of real trainer runs: completed, stopped (stop file, a callback), failed, nested in a pipeline,
and killed with SIGKILL then resumed, with every metric sink (CSV, W&B offline, MLflow file store) checked for
steps that never overlap or reset."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from easytrain import BaseTrainer, Callback, TrainingArguments, parse_arguments
from easytrain.checkpoint import finalized_steps
from easytrain.cli import run
from easytrain.jobs import current_job, job, read_job
from runs import logged
from sink_readers import csv_rows, mlflow_history, mlflow_run, tracker_env, wandb_segments


def read_wandb_id(output_dir: Path) -> str:
    return json.loads((output_dir / "wandb_run.json").read_text())["run_id"]


def tiny_args(output_dir: Path, **overrides) -> TrainingArguments:
    values = dict(output_dir=str(output_dir), max_length=16, train_batch_size=4, eval_batch_size=4, max_steps=6,
                  logging_steps=1, eval_strategy="no", save_strategy="steps", save_steps=100, report_to=["jsonl"],
                  disable_progress_bar=True, save_pretrained_at_end=False, max_train_samples=64, max_eval_samples=8,
                  lr_scheduler_type="constant", warmup_ratio=0.0)
    return TrainingArguments(**{**values, **overrides})


class JobRecorder(Callback):
    """Every job record the trainer's callbacks receive; optionally acts at a step."""

    def __init__(self, at_step: int | None = None, action=None):
        self.records: list[dict] = []
        self.at_step, self.action = at_step, action

    def on_job_update(self, trainer, job):
        self.records.append(job)

    def on_step_end(self, trainer, step):
        if step == self.at_step:
            self.action(trainer)

    def progress(self) -> list[float]:
        return [record["progress"] for record in self.records]


def test_a_completed_run_reports_progress_in_its_range_and_its_metrics(tmp_path: Path) -> None:
    recorder = JobRecorder()
    args = tiny_args(tmp_path / "run", progress_start=10, progress_end=60, eval_strategy="steps", eval_steps=3)
    BaseTrainer(args, callbacks=[recorder]).train()
    record = read_job(args.output_dir)
    assert (record["status"], record["progress"], record["step"], record["total_steps"]) == ("completed", 60.0, 6, 6)
    assert record["metrics"]["train"]["step"] == 6 and record["metrics"]["eval"]["step"] == 6
    assert record["metrics"]["train"]["loss"] == pytest.approx(logged(args.output_dir)[6])
    assert "eval_loss" in record["metrics"]["eval"] and record["eta_seconds"] == 0.0
    steps = [(r["step"], r["progress"]) for r in recorder.records if r["status"] == "running"]
    assert steps[0] == (0, 10.0) and (3, 35.0) in steps and steps[-1] == (6, 60.0)
    assert recorder.progress() == sorted(recorder.progress())
    assert recorder.records[-1]["status"] == "completed"


def test_stop_file_checkpoints_stops_then_the_resume_continues(tmp_path: Path) -> None:
    output_dir = tmp_path / "run"
    drop_stop_file = JobRecorder(at_step=3, action=lambda trainer: (output_dir / "STOP").touch())
    BaseTrainer(tiny_args(output_dir), callbacks=[drop_stop_file]).train()
    record = read_job(output_dir)
    assert (record["status"], record["step"], record["progress"]) == ("stopped", 3, 50.0)
    assert "STOP" in record["stop_reason"] and not (output_dir / "STOP").exists()
    assert finalized_steps(output_dir / "checkpoints") == [3], "stopped with a checkpoint of the last step"
    assert sorted(logged(output_dir)) == [1, 2, 3]

    resumed = JobRecorder()
    BaseTrainer(tiny_args(output_dir, resume_from_checkpoint="latest"), callbacks=[resumed]).train()
    record = read_job(output_dir)
    assert (record["status"], record["resumed_from_step"], record["progress"]) == ("completed", 3, 100.0)
    running = [r["progress"] for r in resumed.records if r["status"] == "running"]
    assert running[0] == 50.0 and running == sorted(running), "progress continues from the restored step"
    assert sorted(logged(output_dir)) == [1, 2, 3, 4, 5, 6]


def test_a_callback_can_stop_the_job(tmp_path: Path) -> None:
    class StopAtHalf(Callback):
        def on_job_update(self, trainer, job):
            if job["progress"] >= 50:
                current_job().request_stop("enough: half way")

    BaseTrainer(tiny_args(tmp_path / "run", save_strategy="no"), callbacks=[StopAtHalf()]).train()
    record = read_job(tmp_path / "run")
    assert (record["status"], record["step"], record["stop_reason"]) == ("stopped", 3, "enough: half way")


def test_a_failure_records_the_error_and_its_traceback(tmp_path: Path) -> None:
    def explode(trainer):
        raise RuntimeError("the data server went away")

    with pytest.raises(RuntimeError, match="went away"):
        BaseTrainer(tiny_args(tmp_path / "run"), callbacks=[JobRecorder(at_step=2, action=explode)]).train()
    record = read_job(tmp_path / "run")
    assert (record["status"], record["step"]) == ("failed", 1)  # your callbacks run before the job's
    assert record["error"]["type"] == "RuntimeError" and record["error"]["message"] == "the data server went away"
    assert "in explode" in record["error"]["traceback"]


def test_trainers_of_a_pipeline_report_into_the_enclosing_job(tmp_path: Path) -> None:
    seen: list[dict] = []
    with job(tmp_path / "pipeline", listeners=[seen.append], min_write_interval=0):
        BaseTrainer(tiny_args(tmp_path / "stage1", max_steps=4, progress_end=50)).train()
        assert read_job(tmp_path / "pipeline")["status"] == "running", "a stage does not end the job"
        BaseTrainer(tiny_args(tmp_path / "stage2", max_steps=2, progress_start=50)).train()
        assert current_job() is not None and current_job().output_dir == tmp_path / "pipeline"
    progress = [(record["step"], record["progress"]) for record in seen if record["status"] == "running"]
    assert list(dict.fromkeys(progress)) == [(0, 0.0), (1, 12.5), (2, 25.0), (3, 37.5), (4, 50.0),  # stage 1
                                             (0, 50.0), (1, 75.0), (2, 100.0)]  # stage 2
    assert read_job(tmp_path / "pipeline")["status"] == "completed"
    assert read_job(tmp_path / "stage1") is None, "the stages report into the pipeline's job only"


class JobFileAtTrainBegin(Callback):
    """Reads `job.json` when training begins (after the output directory was claimed), before the job
    callback marks the run running."""

    def on_train_begin(self, trainer):
        self.record = read_job(trainer.arguments.output_dir)


def test_overwriting_a_run_keeps_the_job_file_of_the_job_running_it(tmp_path: Path) -> None:
    """As `easytrain train` does: the job is opened on the run's own `output_dir` before `train()`; the
    overwrite removes the old run's checkpoints and logs, never the live job's record."""
    BaseTrainer(tiny_args(tmp_path / "run", save_steps=3)).train()
    old = read_job(tmp_path / "run")
    watcher = JobFileAtTrainBegin()
    with job(tmp_path / "run", min_write_interval=0):
        trainer = BaseTrainer(tiny_args(tmp_path / "run", overwrite_output_dir=True, max_steps=2), callbacks=[watcher])
        trainer.train()
    assert watcher.record is not None and watcher.record["status"] == "queued", "the live job's file was removed"
    assert watcher.record["created_at"] > old["finished_at"]
    assert finalized_steps(tmp_path / "run" / "checkpoints") == [2], "the old run's checkpoints are gone"
    assert sorted(logged(tmp_path / "run")) == [1, 2], "and so are its logs"
    assert read_job(tmp_path / "run")["status"] == "completed"


# ----------------------------------------------------------------------------- the same through `easytrain train`

JOB_TASKS = '''
"""Trainers for `--task job_tasks:...`: a callback logs its own metric, or drops the stop file during the last step."""
from pathlib import Path

from easytrain import BaseTrainer, Callback
from easytrain.jobs import current_job, log_metric


class LogsOwnMetric(Callback):
    def on_step_end(self, trainer, step):
        log_metric("my_metric", 10.0 * step, step)


class StopFileAtLastStep(Callback):
    def on_step_end(self, trainer, step):
        if step == trainer.arguments.max_steps:
            (Path(trainer.arguments.output_dir) / "STOP").touch()


class LogMetricTrainer(BaseTrainer):
    status_while_compiling = None

    def __init__(self, arguments, *task_arguments):
        super().__init__(arguments, callbacks=[LogsOwnMetric()])

    def plan_memory(self, state, batch):  # right before the first step compiles
        LogMetricTrainer.status_while_compiling = current_job().record["status"]
        return super().plan_memory(state, batch)


class StopAtLastStepTrainer(BaseTrainer):
    def __init__(self, arguments, *task_arguments):
        super().__init__(arguments, callbacks=[StopFileAtLastStep()])
'''


@pytest.fixture
def job_tasks(tmp_path: Path, monkeypatch):
    """The module of `JOB_TASKS`, importable as `job_tasks` (`--task job_tasks:Class`)."""
    (tmp_path / "job_tasks.py").write_text(JOB_TASKS)
    monkeypatch.syspath_prepend(str(tmp_path))
    import job_tasks

    return job_tasks


def train_as(path: str, job_tasks, args: TrainingArguments) -> None:
    """`easytrain train --task job_tasks:...` (its `run`, in this process), or the trainer's own `train()`."""
    if path == "cli":
        run(args)
    else:
        getattr(job_tasks, args.task.split(":")[1])(args).train()


@pytest.mark.parametrize("path", ["cli", "train"])
def test_log_metric_from_a_callback_reaches_the_runs_sinks(tmp_path: Path, job_tasks, path: str) -> None:
    args = tiny_args(tmp_path / "run", max_steps=3, report_to=["jsonl", "csv"], task="job_tasks:LogMetricTrainer")
    train_as(path, job_tasks, args)
    assert logged(args.output_dir, "my_metric") == {1: 10.0, 2: 20.0, 3: 30.0}
    assert [row["my_metric"] for row in csv_rows(args.output_dir) if row["my_metric"]] == ["10.0", "20.0", "30.0"]
    assert read_job(args.output_dir)["metrics"]["train"]["my_metric"] == 30.0
    assert job_tasks.LogMetricTrainer.status_while_compiling == "running", "docs/jobs.md: running from the loop on"


@pytest.mark.parametrize("path", ["cli", "train"])
def test_a_stop_file_during_the_last_step_completes_the_run_and_is_removed(tmp_path: Path, job_tasks,
                                                                            path: str) -> None:
    args = tiny_args(tmp_path / "run", max_steps=3, task="job_tasks:StopAtLastStepTrainer")
    train_as(path, job_tasks, args)
    record = read_job(args.output_dir)
    assert (record["status"], record["step"], record["progress"], record["stop_reason"]) == ("completed", 3, 100.0,
                                                                                            None)
    assert not (tmp_path / "run" / "STOP").exists(), "left behind, it would stop the next resume at once"


# ----------------------------------------------------------------------------- SIGKILL, then resume

FLAGS = ["--max_length", "16", "--train_batch_size", "4", "--eval_batch_size", "4", "--logging_steps", "1",
         "--eval_strategy", "no", "--save_steps", "4", "--report_to", "jsonl", "csv", "wandb", "mlflow",
         "--disable_progress_bar", "--save_pretrained_at_end", "false", "--max_train_samples", "64",
         "--lr_scheduler_type", "constant", "--warmup_ratio", "0", "--async_checkpointing", "false"]
KILLED_MAX_STEPS = 100_000


def kill_after_checkpoint(output_dir: Path, env: dict[str, str], timeout: float = 240.0) -> None:
    """Train through the CLI; SIGKILL once a checkpoint exists and two more steps are logged."""
    process = subprocess.Popen([sys.executable, "-m", "easytrain", "train", "--output_dir", str(output_dir), *FLAGS,
                                "--max_steps", str(KILLED_MAX_STEPS)], env=env, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + timeout
    while True:
        saved = finalized_steps(output_dir / "checkpoints")
        steps = logged(output_dir) if (output_dir / "metrics.jsonl").exists() else {}
        if saved and steps and max(steps) >= saved[-1] + 2:
            process.send_signal(signal.SIGKILL)
            process.wait(timeout=60)
            return
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            pytest.fail(f"the run to kill did not get far enough:\n{process.communicate()[0][-3000:]}")
        time.sleep(0.05)


def test_killed_run_says_running_and_its_resume_continues_every_sink(tmp_path: Path, monkeypatch) -> None:
    output_dir, trackers = tmp_path / "run", tracker_env(tmp_path)
    # WANDB_SERVICE: this process's W&B service, if an earlier test started one; the killed run must use its own,
    # or its never-finished run would stay open in ours and block the resume below ("run ID is in use")
    inherited = {name: value for name, value in os.environ.items() if name != "WANDB_SERVICE"}
    kill_after_checkpoint(output_dir, {**inherited, "HF_HUB_OFFLINE": "1", "JAX_PLATFORMS": "cpu", **trackers})
    killed = read_job(output_dir)
    restored, last_logged = finalized_steps(output_dir / "checkpoints")[-1], max(logged(output_dir))
    assert killed["status"] == "running" and killed["finished_at"] is None
    assert restored <= killed["step"] <= last_logged and killed["progress"] == pytest.approx(
        100 * killed["step"] / KILLED_MAX_STEPS)

    for name, value in trackers.items():
        monkeypatch.setenv(name, value)
    total = last_logged + 3
    arguments = parse_arguments(["--output_dir", str(output_dir), *FLAGS, "--max_steps", str(total),
                                 "--resume_from_checkpoint", "latest"])
    recorder = JobRecorder()
    BaseTrainer(arguments, callbacks=[recorder]).train()

    record = read_job(output_dir)
    assert (record["status"], record["resumed_from_step"], record["progress"]) == ("completed", restored, 100.0)
    running = [r["progress"] for r in recorder.records if r["status"] == "running"]
    assert running[0] == pytest.approx(100 * restored / total) and running == sorted(running), "never resets"

    losses = logged(output_dir)  # JSONL: the killed run's steps after the checkpoint were dropped, then redone
    assert sorted(losses) == list(range(1, total + 1))
    assert [int(row["step"]) for row in csv_rows(output_dir)] == list(range(1, total + 1))
    # W&B: the same run, resumed, at the global steps after the restored one (a SIGKILL loses what W&B had not
    # flushed of the killed segment, so only the resumed segment is checked point by point)
    killed_segment, resumed = wandb_segments(output_dir, finished=1)
    assert resumed["resume"] and resumed["run_id"] == killed_segment["directory_id"] == read_wandb_id(output_dir)
    assert [(row["_step"], row["train/loss"]) for row in resumed["history"] if "train/loss" in row] == [
        (step, pytest.approx(losses[step])) for step in range(restored + 1, total + 1)]
    # MLflow: one run, one value per step; the steps it held from the killed run are those an exact resume redoes
    assert mlflow_history(output_dir, "train/loss") == [(s, pytest.approx(losses[s])) for s in range(1, total + 1)]
    assert mlflow_run(output_dir)[1].info.status == "FINISHED"
