"""job.json's `metrics` holds, per split, the values of the step it names: a trainer's log or evaluation replaces the
split's record (fields logged once, compile_seconds and the memory plan, do not stay under later steps), while
`log_metric`, one name at a time, adds to the record of its step."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from easytrain import BaseTrainer
from easytrain.jobs import Job, read_job
from runs import FailAt, args_for

ONCE = ("compile_seconds", "planned_memory_mib", "peak_flops")


def train_records(output_dir: Path) -> list[dict]:
    """metrics.jsonl's train records, as `metrics.train` holds them: the step and the values."""
    lines = [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in line.items() if k not in ("split", "time")} for line in lines if line["split"] == "train"]


def test_the_train_record_holds_exactly_the_last_logged_window(tmp_path: Path) -> None:
    args = args_for(tmp_path / "run", max_steps=4, logging_steps=2, save_strategy="no")
    BaseTrainer(args).train()
    first, last = train_records(tmp_path / "run")
    assert first["step"] == 2 and "compile_seconds" in first and "compile_seconds" not in last
    assert read_job(args.output_dir)["metrics"]["train"] == pytest.approx(last)


def test_a_resumed_runs_train_record_holds_exactly_its_last_window(tmp_path: Path) -> None:
    args = args_for(tmp_path / "run", max_steps=8, logging_steps=2, save_steps=4)
    with pytest.raises(RuntimeError, match="a failing callback"):
        BaseTrainer(args, callbacks=[FailAt(5)]).train()
    killed = read_job(args.output_dir)["metrics"]["train"]
    assert killed["step"] == 4 and not set(ONCE) & set(killed), killed
    BaseTrainer(args_for(tmp_path / "run", max_steps=8, logging_steps=2, save_steps=4,
                         resume_from_checkpoint="latest")).train()
    records = train_records(tmp_path / "run")
    assert [r["step"] for r in records] == [2, 4, 6, 8] and "compile_seconds" in records[2], records
    assert read_job(args.output_dir)["metrics"]["train"] == pytest.approx(records[-1])


def test_log_metric_adds_to_the_record_of_its_step_and_a_full_record_replaces_the_others(tmp_path: Path) -> None:
    with Job(tmp_path, report_to=["none"], min_write_interval=0) as running:
        running.update_metrics("train", 2, {"loss": 2.0, "compile_seconds": 9.0}, complete=True)
        running.log_metric("my_metric", 30.0, 3)  # a callback's, at the step whose log comes next
        running.log_metric("other", 1.0, 3)
        running.update_metrics("train", 3, {"loss": 1.5}, complete=True)
        assert read_job(tmp_path)["metrics"]["train"] == {"step": 3, "loss": 1.5, "my_metric": 30.0, "other": 1.0}
        running.update_metrics("train", 4, {"loss": 1.0}, complete=True)
        assert read_job(tmp_path)["metrics"]["train"] == {"step": 4, "loss": 1.0}
