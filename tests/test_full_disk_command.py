"""`easytrain train` on a disk that fills up during a checkpoint save: one `easytrain: error:` line (exit status 1,
job.json `failed`) naming the step whose save failed, the full disk, the checkpoint kept and how to resume; no
tracebacks of Orbax's. The checkpoints before it are intact, and once there is space the run resumes from them."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from easytrain.cli import FAILED_EXIT_CODE, main

from runs import logged
from test_checkpoint_save_errors import fail_progress_of

RUN = ["--max_length", "16", "--train_batch_size", "4", "--max_steps", "6", "--max_train_samples", "32",
       "--logging_steps", "1", "--save_steps", "2", "--eval_strategy", "no", "--report_to", "jsonl",
       "--disable_progress_bar", "true", "--save_pretrained_at_end", "false"]


@pytest.fixture(autouse=True)
def fresh_progress_handler(monkeypatch: pytest.MonkeyPatch) -> None:
    """`main` gives the `easytrain` logger a handler on this test's stderr (one of an earlier test's is closed)."""
    monkeypatch.setattr(logging.getLogger("easytrain"), "handlers", [])


def test_a_full_disk_ends_the_command_with_one_error_line_then_it_resumes(tmp_path: Path,
                                                                          monkeypatch: pytest.MonkeyPatch,
                                                                          capfd: pytest.CaptureFixture,
                                                                          caplog: pytest.LogCaptureFixture) -> None:
    out = tmp_path / "run"
    with pytest.MonkeyPatch.context() as full_disk, caplog.at_level(logging.INFO):  # undone alone: the handler stays
        fail_progress_of(4, OSError(28, "No space left on device"), full_disk)
        assert main(["train", "--output_dir", str(out), *RUN]) == FAILED_EXIT_CODE
    err = capfd.readouterr().err
    errors = [line for line in err.splitlines() if "error" in line.lower()]
    assert len(errors) == 1 and errors[0].startswith("easytrain: error: the checkpoint of step 4 could not be "
                                                     "written: the disk is full"), err
    assert "Traceback" not in err and f"{out / 'checkpoints' / '2'}, is intact" in errors[0]
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR] == []
    record = json.loads((out / "job.json").read_text())
    assert record["status"] == "failed" and record["error"]["type"] == "CheckpointWriteError"
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["2"]
    # space freed: the command the message names resumes from checkpoint 2
    assert main(["train", "--config", str(out / "arguments.json")]) == 0  # it records resume_from_checkpoint latest
    record = json.loads((out / "job.json").read_text())  # not the log line: an earlier test's logging may hide it
    assert record["status"] == "completed" and record["resumed_from_step"] == 2, record
    assert main(["train", "--output_dir", str(tmp_path / "uninterrupted"), *RUN]) == 0
    assert logged(out) == logged(tmp_path / "uninterrupted") and len(logged(out)) == 6  # exactly, step by step


def test_a_full_disk_that_leaves_no_room_for_job_json_still_ends_with_the_error_line(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture) -> None:
    """Recording the failure in job.json fails too (the disk is still full): the same one error line, saying so."""
    from easytrain import jobs

    written = jobs.write_json_atomically

    def job_json(path, record):
        if record.get("status") == "failed":
            raise OSError(28, "No space left on device")
        return written(path, record)

    fail_progress_of(4, OSError(28, "No space left on device"), monkeypatch)
    monkeypatch.setattr(jobs, "write_json_atomically", job_json)
    assert main(["train", "--output_dir", str(tmp_path / "run"), *RUN]) == FAILED_EXIT_CODE
    err = capfd.readouterr().err
    assert "Traceback" not in err, err
    line, = [line for line in err.splitlines() if "error" in line.lower()]
    assert line.startswith("easytrain: error: the checkpoint of step 4 could not be written: the disk is full"), line
    assert line.endswith("(job.json could not record this failure: [Errno 28] No space left on device)"), line
