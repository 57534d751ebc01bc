"""A failure during a multi-process `train()`'s set-up is named on every process, and a process left waiting for a
process that failed ends itself, job.json saying why (`easytrain.trainers.process_failure`)."""

import json
import threading
import time

import pytest

from easytrain.jobs import Job
from easytrain.trainers import process_failure
from easytrain.trainers.process_failure import OtherProcessFailedError
from runs import train_on_localhost
from test_multiprocess import free_port
from test_process_failure import BAD_BATCH, TIMEOUT

MISSING = FileNotFoundError("train_file /data/train.txt: no such file on this host")


def test_a_setup_failure_is_published_for_the_others(process_0_of_2):
    with pytest.raises(FileNotFoundError), process_failure.running():
        raise MISSING
    assert process_0_of_2.store["easytrain/failed/1/0"].endswith(" FileNotFoundError: train_file /data/train.txt: "
                                                                 "no such file on this host")


def test_an_error_in_setup_after_another_process_failure_names_that_process(process_0_of_2):
    with pytest.raises(OtherProcessFailedError, match="^process 1 failed: FileNotFoundError: train_file") as raised:
        with process_failure.running():
            process_failure.publish(process_0_of_2, 1, MISSING, now=time.time() - 1)  # before this process's
            raise TIMEOUT
    assert raised.value.__cause__ is TIMEOUT


def test_the_steps_inside_a_run_share_its_keys_and_are_handled_once(process_0_of_2, monkeypatch):
    monkeypatch.setattr(process_failure, "LOOKUP_SECONDS", 0.05)
    with pytest.raises(ValueError), process_failure.running():
        with process_failure.watching():  # the loop's: no second watcher, no run of its own
            try:
                raise ValueError("bad batch")
            except ValueError as error:  # what the loop does with a failure of its steps
                process_failure.publish_failure(error)
                process_failure.reraise_naming_others(error)
    assert list(process_0_of_2.store) == ["easytrain/failed/1/0", "easytrain/first_failure/1"]


@pytest.fixture
def stuck_survivor(process_0_of_2, monkeypatch, tmp_path):
    """Process 0 inside a job in `tmp_path`, ending within a second of logging another's failure: `exits` gets the
    exit status it would end with."""
    monkeypatch.setattr(process_failure, "WATCH_GRACE_SECONDS", 0.05)
    monkeypatch.setattr(process_failure, "EXIT_AFTER_SECONDS", 0.3)
    exits: list[int] = []
    ended = threading.Event()
    monkeypatch.setattr(process_failure, "exit_process", lambda code: (exits.append(code), ended.set()))
    return process_0_of_2, exits, ended


def test_a_survivor_without_progress_marks_the_job_failed_and_exits(stuck_survivor, tmp_path):
    client, exits, ended = stuck_survivor
    with Job(tmp_path, report_to=["none"]), process_failure.running():
        process_failure.publish(client, 1, BAD_BATCH)
        assert ended.wait(20), "the survivor never ended"
        record = json.loads((tmp_path / "job.json").read_text())  # as the process left it
    assert exits == [process_failure.EXIT_CODE]
    assert record["status"] == "failed" and record["error"]["type"] == "OtherProcessFailedError"
    assert record["error"]["message"].startswith("process 1 failed: TokenRangeError: A batch from `collate`")
    assert "This process (0) made no progress for 0.3 s after it" in record["error"]["message"]


def test_a_survivor_that_makes_progress_or_ends_is_not_ended(stuck_survivor, tmp_path):
    client, exits, ended = stuck_survivor
    steps = iter(range(1_000_000))
    with Job(tmp_path, report_to=["none"]), process_failure.running():
        with process_failure.watching(lambda: next(steps)):  # a new value at every look: progress
            process_failure.publish(client, 1, BAD_BATCH)
            assert not ended.wait(1.5), "ended while making progress"
        assert ended.wait(20), "never ended once the progress stopped"
    assert exits == [process_failure.EXIT_CODE]
    ended.clear()
    with process_failure.running():  # the next train() ends before its bound: nothing more ends it
        process_failure.publish(client, 1, BAD_BATCH)
    assert not ended.wait(1.0) and exits == [process_failure.EXIT_CODE]


FLAGS = ["--max_length", "16", "--train_batch_size", "8", "--logging_steps", "1", "--eval_strategy", "no",
         "--save_strategy", "no", "--report_to", "jsonl", "--disable_progress_bar", "--save_pretrained_at_end", "false",
         "--max_steps", "8", "--validation_split_percentage", "0"]


def two_processes(tmp_path, tokenizer_dir, text_lines, task: str) -> tuple[list[int], list[str]]:
    (train := tmp_path / "train.txt").write_text("\n".join(text_lines) + "\n")
    return train_on_localhost(
        [["--output_dir", str(tmp_path / "run"), "--train_file", str(train), "--tokenizer_name", tokenizer_dir,
          *FLAGS, "--task", f"tests.failing_setup_task:{task}"] for _ in range(2)], free_port(), timeout=150)


@pytest.mark.slow
def test_a_setup_failure_on_process_1_is_named_by_process_0(tmp_path, tokenizer_dir, text_lines):
    """Process 1 cannot read its train file; process 0, waiting for it in its first collective, names that error
    instead of failing (or waiting) in a collective that names nothing."""
    codes, outputs = two_processes(tmp_path, tokenizer_dir, text_lines, "MissingFileOnProcessOne")
    assert codes[0] == process_failure.EXIT_CODE and codes[1] not in (0, None), f"exit statuses {codes}"
    assert "FileNotFoundError: train_file" in outputs[1], outputs[1][-3000:]
    assert "process 1 failed: FileNotFoundError: train_file" in outputs[0], outputs[0][-3000:]
    record = json.loads((tmp_path / "run" / "job.json").read_text())
    assert record["status"] == "failed", record
    assert record["error"]["message"].startswith("process 1 failed: FileNotFoundError: train_file"), record


@pytest.mark.slow
def test_a_process_left_waiting_by_a_failed_one_ends_itself_and_says_why(tmp_path, tokenizer_dir, text_lines):
    """Process 1's callback fails after step 3; process 0, blocked in step 4's collectives, ends with exit status 1
    shortly after, its job.json failed naming process 1's error (before: both aborted by JAX's exit barrier after
    5 minutes, job.json still "running")."""
    codes, outputs = two_processes(tmp_path, tokenizer_dir, text_lines, "CallbackFailsOnProcessOne")
    assert codes[0] == process_failure.EXIT_CODE, f"exit statuses {codes}: {outputs[0][-3000:]}"
    assert "RuntimeError: a callback failed on process 1 at step 3" in outputs[1], outputs[1][-3000:]
    assert "This process (0) made no progress for 3 s after it" in outputs[0], outputs[0][-3000:]
    record = json.loads((tmp_path / "run" / "job.json").read_text())
    assert record["status"] == "failed", record
    assert record["error"]["message"].startswith("process 1 failed: RuntimeError: a callback failed on process 1")
