"""CSV, W&B and MLflow sinks through the Reporter: content, resume without overlap, missing packages.

W&B runs offline and MLflow on a file store under tmp_path (`sink_readers.tracker_env`); nothing
reaches the network.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from easytrain import TrainingArguments
from easytrain.errors import ArgumentError
from easytrain.reporting import Reporter
from sink_readers import csv_rows, mlflow_history, mlflow_run, tracker_env, wandb_segments


@pytest.fixture
def offline_trackers(tmp_path, monkeypatch) -> None:
    for name, value in tracker_env(tmp_path).items():
        monkeypatch.setenv(name, value)


def log_steps(output_dir: Path, report_to: list[str], steps, initial_step: int = 0, scale: float = 1.0,
              status: str = "completed") -> None:
    reporter = Reporter(output_dir=output_dir, report_to=report_to, total_steps=10, initial_step=initial_step,
                        show_progress=False, run_config={"learning_rate": 0.1, "seed": 3})
    for step in steps:
        reporter.log(step, {"loss": scale * step})
    reporter.close(status)


# ----------------------------------------------------------------------------- CSV


def test_csv_has_one_row_per_log_and_grows_columns(tmp_path: Path) -> None:
    with Reporter(output_dir=tmp_path, report_to=["csv"], total_steps=10, show_progress=False) as reporter:
        reporter.log(1, {"loss": 2.5, "learning_rate": 1e-3})
        reporter.log(2, {"eval_loss": 2.25}, split="eval")  # a new column: the file is rewritten, wider
        reporter.log(3, {"loss": float("nan")})
    rows = csv_rows(tmp_path)
    header = (tmp_path / "metrics.csv").read_text().splitlines()[0]
    assert header == "step,split,time,loss,learning_rate,eval_loss"
    assert [(r["step"], r["split"], r["loss"], r["eval_loss"]) for r in rows] == [
        ("1", "train", "2.5", ""), ("2", "eval", "", "2.25"), ("3", "train", "nan", "")]
    assert float(rows[0]["learning_rate"]) == 1e-3 and float(rows[1]["time"]) > 0
    assert not list(tmp_path.glob(".*.tmp"))


def test_csv_resume_drops_later_rows_and_a_torn_line(tmp_path: Path) -> None:
    log_steps(tmp_path, ["csv"], range(1, 6))
    with (tmp_path / "metrics.csv").open("a") as file:
        file.write("6,train,17")  # torn row from a kill mid-write
    log_steps(tmp_path, ["csv"], [4, 5], initial_step=3, scale=10.0)
    assert [(r["step"], r["loss"]) for r in csv_rows(tmp_path)] == [
        ("1", "1.0"), ("2", "2.0"), ("3", "3.0"), ("4", "40.0"), ("5", "50.0")]


@pytest.mark.parametrize("initial_step", [0, 5])
def test_csv_killed_while_writing_its_header_gets_it_once(tmp_path: Path, initial_step: int) -> None:
    (tmp_path / "metrics.csv").write_text("step,spl")  # killed mid-write of the first line
    log_steps(tmp_path, ["csv"], [6], initial_step=initial_step)
    lines = (tmp_path / "metrics.csv").read_text().splitlines()
    assert lines[0] == "step,split,time,loss" and len(lines) == 2
    assert [(r["step"], r["loss"]) for r in csv_rows(tmp_path)] == [("6", "6.0")]


# ----------------------------------------------------------------------------- Weights & Biases


def test_wandb_resume_reopens_the_run_with_steps_continuing(tmp_path: Path, offline_trackers) -> None:
    run_dir = tmp_path / "run"
    log_steps(run_dir, ["wandb"], range(1, 6))  # interrupted after step 5; its checkpoint is step 3
    log_steps(run_dir, ["wandb"], range(4, 8), initial_step=3, scale=10.0)
    first, resumed = wandb_segments(run_dir, finished=2)
    assert first["run_id"] == resumed["run_id"] and resumed["resume"], "a resume continues the same W&B run"
    assert {"learning_rate", "seed"} <= first["config"]
    assert [(row["_step"], row["train/loss"]) for row in first["history"]] == [(s, float(s)) for s in range(1, 6)]
    # explicit global steps: the resumed run continues at 4, never at 0. W&B keeps one value per step itself
    # (steps 4 and 5, which it holds, are ignored when this segment reaches the same run).
    assert [(row["_step"], row["train/loss"]) for row in resumed["history"]] == [(s, 10.0 * s) for s in range(4, 8)]
    log_steps(run_dir, ["wandb"], [1, 2])  # a fresh start (no restored step) is a new W&B run
    assert len({segment["run_id"] for segment in wandb_segments(run_dir, finished=3)}) == 2


# ----------------------------------------------------------------------------- MLflow


def test_mlflow_resume_reopens_the_run_and_never_logs_a_step_twice(tmp_path: Path, offline_trackers) -> None:
    run_dir = tmp_path / "run"
    log_steps(run_dir, ["mlflow"], range(1, 6), status="failed")
    _, run = mlflow_run(run_dir)
    assert run.info.status == "FAILED" and run.data.params["learning_rate"] == "0.1"
    first_id = run.info.run_id
    log_steps(run_dir, ["mlflow"], range(4, 8), initial_step=3, scale=10.0)
    _, run = mlflow_run(run_dir)
    assert run.info.run_id == first_id and run.info.status == "FINISHED"
    assert mlflow_history(run_dir, "train/loss") == [(1, 1.0), (2, 2.0), (3, 3.0), (4, 4.0), (5, 5.0),
                                                      (6, 60.0), (7, 70.0)]


def test_mlflow_fresh_run_keeps_step_zero(tmp_path: Path, offline_trackers) -> None:
    """An evaluation before training logs at step 0: a fresh run has no floor to drop it."""
    log_steps(tmp_path / "run", ["mlflow"], range(0, 3))
    assert mlflow_history(tmp_path / "run", "train/loss") == [(0, 0.0), (1, 1.0), (2, 2.0)]


def test_mlflow_resume_completes_a_step_the_kill_tore(tmp_path: Path, offline_trackers) -> None:
    """A file store writes a batch metric by metric: a kill mid-batch leaves a step some metrics lack."""
    run_dir = tmp_path / "run"
    log_steps(run_dir, ["mlflow"], range(1, 6), status="failed")
    client, run = mlflow_run(run_dir)
    client.log_metric(run.info.run_id, "train/accuracy", 0.5, step=6)  # step 6 torn: its accuracy, not its loss
    log_steps(run_dir, ["mlflow"], range(4, 8), initial_step=3, scale=10.0)
    assert mlflow_history(run_dir, "train/loss") == [(1, 1.0), (2, 2.0), (3, 3.0), (4, 4.0), (5, 5.0),
                                                      (6, 60.0), (7, 70.0)]
    assert mlflow_history(run_dir, "train/accuracy") == [(6, 0.5)]


def test_trackers_record_how_the_run_ended(tmp_path: Path, offline_trackers) -> None:
    log_steps(tmp_path / "stopped", ["mlflow"], [1], status="stopped")
    assert mlflow_run(tmp_path / "stopped")[1].info.status == "KILLED"
    with pytest.raises(RuntimeError), Reporter(output_dir=tmp_path / "ctx", report_to=["mlflow"], total_steps=2,
                                               show_progress=False) as reporter:
        reporter.log(1, {"loss": math.inf})
        raise RuntimeError("crash inside the with block")
    _, run = mlflow_run(tmp_path / "ctx")
    assert run.info.status == "FAILED" and run.data.metrics["train/loss"] == math.inf


# ----------------------------------------------------------------------------- missing packages


@pytest.mark.parametrize("sink", ["wandb", "mlflow"])
def test_a_missing_tracker_package_names_report_to_and_the_extra(sink, tmp_path, monkeypatch) -> None:
    import importlib.util

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == sink else real_find_spec(name, *a))
    expected = rf"report_to: '{sink}' needs the {sink} package.*pip install 'easytrain\[{sink}\]'"
    with pytest.raises(ArgumentError, match=expected):
        TrainingArguments(output_dir=str(tmp_path), report_to=["jsonl", sink])  # before any compute
    with pytest.raises(ArgumentError, match=expected):
        Reporter(output_dir=tmp_path, report_to=[sink], total_steps=1, enabled=False)
    assert not any(tmp_path.iterdir())


def test_wandb_that_cannot_start_names_report_to_and_the_ways_out(tmp_path, monkeypatch, offline_trackers) -> None:
    wandb = pytest.importorskip("wandb")

    def no_key(**kwargs):
        raise wandb.errors.UsageError("No API key configured. Use `wandb login` to log in.")

    monkeypatch.setattr(wandb, "init", no_key)
    with pytest.raises(ArgumentError, match=r"report_to: W&B could not start a run.*No API key.*WANDB_MODE=offline"):
        Reporter(output_dir=tmp_path, report_to=["wandb"], total_steps=1, show_progress=False)
    assert not (tmp_path / "wandb_run.json").exists(), "no run id recorded for a run that never started"


def test_mlflow_that_cannot_use_its_store_names_report_to(tmp_path, monkeypatch, offline_trackers) -> None:
    pytest.importorskip("mlflow")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "nosuchscheme://nowhere")
    with pytest.raises(ArgumentError, match=r"report_to: MLflow could not start a run at 'nosuchscheme://nowhere'.*"
                                            r"MLFLOW_TRACKING_URI"):
        Reporter(output_dir=tmp_path, report_to=["mlflow"], total_steps=1, show_progress=False)
