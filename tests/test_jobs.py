"""`easytrain.jobs` around hand-written loops: every status, progress mapping, ETA, data, sinks, stop requests,
atomic writes, and that only the main process writes."""

from __future__ import annotations

import json
import math
import threading
from pathlib import Path

import pytest
from doc_snippets import python_blocks, run_block

from easytrain import TrainingArguments
from easytrain.errors import ArgumentError, OutputDirError
from easytrain.jobs import (
    Job,
    add_job_data,
    current_job,
    job,
    log_metric,
    progress_update,
    read_job,
    should_stop,
)
from event_files import effective_scalars
from sink_readers import csv_rows


def strict_loads(text: str) -> dict:
    """Parse as a strict JSON reader (a browser, jq) would: NaN and Infinity are refused."""
    def refuse(constant):
        raise ValueError(f"non-standard JSON constant {constant}")

    return json.loads(text, parse_constant=refuse)


def strict_json(path: Path) -> dict:
    return strict_loads(path.read_text())


def test_queued_then_running_then_completed_with_progress_mapped_into_the_range(tmp_path: Path) -> None:
    seen: list[dict] = []
    with job(tmp_path, progress_start=20, progress_end=60, min_write_interval=0, listeners=[seen.append]):
        assert read_job(tmp_path)["status"] == "queued"  # entered, nothing reported yet
        progress_update(50)
        running = read_job(tmp_path)
        assert (running["status"], running["progress"]) == ("running", 40.0)
    final = strict_json(tmp_path / "job.json")
    assert (final["status"], final["progress"], final["error"]) == ("completed", 60.0, None)
    assert final["finished_at"] >= final["started_at"] >= final["created_at"]
    assert [record["status"] for record in seen] == ["queued", "running", "running", "completed"]
    assert current_job() is None


def test_failure_records_error_and_traceback_and_propagates(tmp_path: Path) -> None:
    @job(tmp_path)
    def train() -> None:
        progress_update(10)
        raise ZeroDivisionError("diverged at step 7")

    with pytest.raises(ZeroDivisionError):
        train()
    record = read_job(tmp_path)
    assert record["status"] == "failed" and record["progress"] == 10.0
    assert record["error"]["type"] == "ZeroDivisionError" and record["error"]["message"] == "diverged at step 7"
    traceback = record["error"]["traceback"]
    assert "in train" in traceback and 'raise ZeroDivisionError("diverged' in traceback


def test_stop_file_stops_the_loop_and_is_removed(tmp_path: Path) -> None:
    finished: list[int] = []

    @job(tmp_path, stop_file="PLEASE_STOP")
    def train() -> None:
        for step in range(1, 11):
            progress_update(10 * step)
            if step == 3:
                (tmp_path / "PLEASE_STOP").touch()  # as a person or a scheduler would
            if should_stop():
                finished.append(step)
                return

    train()
    record = read_job(tmp_path)
    assert finished == [3]
    assert record["status"] == "stopped" and record["progress"] == 30.0
    assert "PLEASE_STOP" in record["stop_reason"] and record["error"] is None
    assert not (tmp_path / "PLEASE_STOP").exists(), "an honoured stop file is removed so the next start runs"


def test_a_listener_can_request_a_stop(tmp_path: Path) -> None:
    def stop_at_half(record) -> None:
        if record["progress"] >= 50:
            current_job().request_stop("enough for today")

    with job(tmp_path, listeners=[stop_at_half]) as running:
        for step in range(1, 11):
            progress_update(10 * step)
            if running.should_stop():
                break
    record = read_job(tmp_path)
    assert (record["status"], record["stop_reason"], record["progress"]) == ("stopped", "enough for today", 50.0)


def test_ctrl_c_is_stopped_not_failed(tmp_path: Path) -> None:
    with pytest.raises(KeyboardInterrupt), job(tmp_path):
        progress_update(5)
        raise KeyboardInterrupt
    record = read_job(tmp_path)
    assert (record["status"], record["error"], record["stop_reason"]) == ("stopped", None, "KeyboardInterrupt")


def test_job_data_is_json_checked_and_kept_across_a_resume(tmp_path: Path) -> None:
    with job(tmp_path):
        add_job_data("dataset", {"rows": 1000, "name": "arithmetic"})
        with pytest.raises(TypeError, match=r"add_job_data\('handle', \.\.\.\): .*JSON-serializable"):
            add_job_data("handle", object())
        progress_update(30)
    assert read_job(tmp_path)["data"] == {"dataset": {"rows": 1000, "name": "arithmetic"}}
    with job(tmp_path) as resumed:
        resumed.begin(total_steps=10, initial_step=3)
        add_job_data("attempt", 2)
    record = read_job(tmp_path)
    assert record["data"] == {"dataset": {"rows": 1000, "name": "arithmetic"}, "attempt": 2}
    assert record["resumed_from_step"] == 3


def test_log_metric_reaches_every_sink_and_a_resume_continues_without_overlap(tmp_path: Path) -> None:
    killed = Job(tmp_path, report_to=["jsonl", "csv"], min_write_interval=0)
    killed.open()  # a run that dies without leaving its job (SIGKILL): no finish, no close
    killed.begin(total_steps=10)
    for step in range(1, 6):
        killed.log_metric("loss", 1.0 / step, step)
        killed.progress_update(10 * step)
    killed.log_metric("accuracy", float("nan"), 5, split="eval")
    record = strict_json(tmp_path / "job.json")
    assert (record["status"], record["progress"]) == ("running", 50.0)
    assert record["metrics"] == {"train": {"step": 5, "loss": 0.2}, "eval": {"step": 5, "accuracy": "nan"}}
    progress_seen: list[float] = []
    with job(tmp_path, report_to=["jsonl", "csv"], listeners=[lambda r: progress_seen.append(r["progress"])]) as again:
        again.begin(total_steps=10, initial_step=3)  # restored step 3: steps 4 and 5 are logged again
        for step in range(4, 11):
            log_metric("loss", 10.0 + step, step)
            progress_update(10 * step)
    jsonl = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [(r["step"], r["split"]) for r in jsonl] == [(s, "train") for s in range(1, 11)]
    assert [int(r["step"]) for r in csv_rows(tmp_path)] == list(range(1, 11))
    assert progress_seen[:2] == [50.0, 30.0], "queued: where the killed run was; running: the restored step"
    assert progress_seen[1:] == sorted(progress_seen[1:]), "progress never resets"
    assert read_job(tmp_path)["status"] == "completed"


def test_eta_extrapolates_the_rate_since_the_first_report(tmp_path: Path, monkeypatch) -> None:
    now = [100.0]
    monkeypatch.setattr("easytrain.jobs.time.monotonic", lambda: now[0])
    with job(tmp_path) as running:
        now[0] = 500.0
        running.progress_update(10)  # the anchor: time before it (compilation, data loading) does not count
        assert running.record["eta_seconds"] is None
        now[0] = 510.0
        running.progress_update(30)  # 20 % in 10 s
        assert running.record["eta_seconds"] == pytest.approx(35.0)
        now[0] = 530.0
        running.progress_update(40)  # 30 % in 30 s
        assert running.record["eta_seconds"] == pytest.approx(60.0)


def test_only_the_main_process_writes(tmp_path: Path, monkeypatch) -> None:
    import jax

    monkeypatch.setattr(jax, "process_index", lambda: 1)
    seen: list[dict] = []
    with job(tmp_path / "run", report_to=["jsonl"], listeners=[seen.append]):
        progress_update(50)
        log_metric("loss", 1.0, 1)
        add_job_data("key", "value")
    assert not (tmp_path / "run").exists() and seen == []


def test_the_file_is_always_complete_while_it_is_rewritten(tmp_path: Path) -> None:
    errors: list[Exception] = []
    done = threading.Event()

    def read_continuously() -> None:
        while not done.is_set():
            try:
                if (tmp_path / "job.json").exists():
                    json.loads((tmp_path / "job.json").read_text())
            except ValueError as error:  # a half-written file
                errors.append(error)

    reader = threading.Thread(target=read_continuously)
    with job(tmp_path, min_write_interval=0) as running:
        reader.start()
        for index in range(400):
            running.add_job_data(f"key{index % 20}", "x" * 2000)
    done.set()
    reader.join()
    assert errors == []
    assert sorted(path.name for path in tmp_path.iterdir()) == ["job.json"], "no temporary file left"


def test_each_decorated_call_is_a_fresh_job(tmp_path: Path) -> None:
    @job(tmp_path)
    def step(value: int) -> int:
        add_job_data(f"call{value}", value)
        return value

    assert step(1) == 1 and step(2) == 2
    assert read_job(tmp_path)["data"] == {"call2": 2}  # a fresh start (not a resume) keeps no old data


def test_reporting_outside_a_job_says_how_to_start_one() -> None:
    with pytest.raises(RuntimeError, match=r"log_metric\(\) .*@easytrain.jobs.job\(output_dir\)"):
        log_metric("loss", 1.0, 1)
    with pytest.raises(RuntimeError, match=r"progress_update\(\)"):
        progress_update(1)


def test_progress_settings_are_checked(tmp_path: Path) -> None:
    with pytest.raises(ArgumentError, match=r"progress_end: must be >= progress_start=50"):
        Job(tmp_path, progress_start=50, progress_end=10)
    with pytest.raises(ArgumentError, match=r"progress_start: must be a percentage in \[0, 100\]"):
        TrainingArguments(output_dir=str(tmp_path), progress_start=-5)
    with pytest.raises(ArgumentError, match="report_to"):
        Job(tmp_path, report_to=["neptune"])
    with job(tmp_path), pytest.raises(ValueError, match=r"percentage in \[0, 100\], got 150"):
        progress_update(150)


def test_the_hand_written_loop_examples_of_the_docs_run_as_written(tmp_path: Path, monkeypatch, capsys) -> None:
    """docs/jobs.md: the decorated loop, then its resume from step 10 (the pipeline block trains two default
    runs; test_job_runs.py::test_trainers_of_a_pipeline_report_into_the_enclosing_job covers it at tiny size)."""
    blocks = python_blocks(Path(__file__).resolve().parents[1] / "docs" / "jobs.md")
    assert "BaseTrainer" in blocks[2].source and len(blocks) == 3
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    run_block(blocks[0], namespace)
    assert float(capsys.readouterr().out) == pytest.approx(3.0, abs=1e-3)
    run_block(blocks[1], namespace)
    output_dir = tmp_path / "runs" / "handwritten"
    record = read_job(output_dir)
    assert (record["status"], record["resumed_from_step"], record["progress"]) == ("completed", 10, 100.0)
    assert record["data"] == {"model": "y = w * x"}
    assert [int(row["step"]) for row in csv_rows(output_dir)] == list(range(1, 21))


# ----------------------------------------------------------------------------- found in review


def test_a_fresh_job_logs_through_logs_linked_to_empty_files_elsewhere(tmp_path: Path) -> None:
    """An empty log (linked before the first run to another disk) is no other run's: the job writes through it,
    overwrite_metrics or not, and the link stays."""
    run, disk = tmp_path / "run", tmp_path / "disk"
    run.mkdir()
    disk.mkdir()
    for name in ("metrics.jsonl", "metrics.csv"):
        (disk / name).write_bytes(b"")
        (run / name).symlink_to(disk / name)
    for overwrite in (False, True):
        job(run, report_to=["jsonl", "csv"], overwrite_metrics=overwrite)(lambda: log_metric("loss", 1.0, 1))()
        assert (run / "metrics.jsonl").is_symlink() and (run / "metrics.csv").is_symlink()
        assert [json.loads(line)["step"] for line in (disk / "metrics.jsonl").read_text().splitlines()] == [1]
        assert [int(r["step"]) for r in csv_rows(disk)] == [1]
        for name in ("metrics.jsonl", "metrics.csv"):
            (disk / name).write_bytes(b"")


def test_a_fresh_job_refuses_another_runs_metrics_unless_told_to_overwrite(tmp_path: Path) -> None:
    """Each decorated call is a fresh job: the second would log steps 1..3 a second time into every sink."""
    def loop(scale: float) -> None:
        for step in range(1, 4):
            log_metric("loss", scale / step, step)

    sinks = ["jsonl", "csv", "tensorboard"]
    train = job(tmp_path, report_to=sinks)(loop)
    train(1.0)
    with pytest.raises(OutputDirError, match=r"already holds another run's metrics.jsonl, metrics.csv, "
                                             r"tensorboard.*initial_step.*overwrite_metrics=True"):
        train(2.0)
    assert read_job(tmp_path)["status"] == "failed"
    job(tmp_path, report_to=sinks, overwrite_metrics=True)(loop)(3.0)
    expected = [(1, 3.0), (2, 1.5), (3, 1.0)]
    jsonl = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [(r["step"], r["loss"]) for r in jsonl] == expected
    assert [(int(r["step"]), float(r["loss"])) for r in csv_rows(tmp_path)] == expected
    assert effective_scalars(tmp_path / "tensorboard")["train/loss"] == expected


def test_non_finite_metrics_are_strict_json_as_in_the_job_file(tmp_path: Path) -> None:
    with job(tmp_path, report_to=["jsonl"]):
        for step, value in enumerate([math.nan, math.inf, -math.inf, 0.5], start=1):
            log_metric("loss", value, step)
    lines = [strict_loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [line["loss"] for line in lines] == ["nan", "inf", "-inf", 0.5]
    assert strict_json(tmp_path / "job.json")["metrics"]["train"]["loss"] == 0.5


def test_a_job_that_ends_unfinished_has_no_eta(tmp_path: Path, monkeypatch) -> None:
    now = [0.0]
    monkeypatch.setattr("easytrain.jobs.time.monotonic", lambda: now[0])

    def half_way(running: Job) -> None:
        for percent in (10, 20):
            now[0] += 1.0
            running.progress_update(percent)
        assert running.record["eta_seconds"] == pytest.approx(8.0)

    with job(tmp_path / "stopped") as running:
        half_way(running)
        running.request_stop("enough")
    with pytest.raises(RuntimeError), job(tmp_path / "failed") as running:
        half_way(running)
        raise RuntimeError("diverged")
    for name in ("stopped", "failed"):
        record = read_job(tmp_path / name)
        assert (record["status"], record["eta_seconds"]) == (name, None)


def test_a_stop_file_found_at_the_last_step_completes_the_job_and_is_removed(tmp_path: Path) -> None:
    """Nothing was left to stop: the job completed, and the file must not stop the next start at once."""
    @job(tmp_path)
    def train() -> None:
        for step in range(1, 4):
            progress_update(100 * step / 3)
            if step == 3:
                (tmp_path / "STOP").touch()
            if should_stop():
                break

    train()
    record = read_job(tmp_path)
    assert (record["status"], record["progress"], record["stop_reason"]) == ("completed", 100.0, None)
    assert not (tmp_path / "STOP").exists()
