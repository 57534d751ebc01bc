"""A run that ends before its first step puts the older run in its output_dir back (`held_run`); job.json records
the failure, and keeps the older run's `data` entries (`add_job_data`) for a later resume of that run
(`older_run_data`), which starts from that record."""

from __future__ import annotations

import json
import os
import logging
from pathlib import Path

import pytest

from easytrain import BaseTrainer
from easytrain.cli import FAILED_EXIT_CODE, main
from easytrain.errors import DeviceMemoryError
from easytrain.jobs import OLDER_RUN_DATA, Job, read_job, resumable_data
from easytrain.trainers.claim import claim_output_dir

from runs import args_for

OLDER_DATA = {"dataset": {"rows": 64, "source": "the older run's"}}
RUN = ["--max_length", "16", "--train_batch_size", "4", "--max_steps", "4", "--max_train_samples", "32",
       "--logging_steps", "1", "--save_steps", "2", "--eval_strategy", "no", "--report_to", "jsonl",
       "--disable_progress_bar", "true", "--save_pretrained_at_end", "false"]


class RefusedMemory(BaseTrainer):
    """A step that cannot fit the device: `plan_memory` refuses it, as `memory_plan.check_fits` does on a GPU."""

    def plan_memory(self, state, batch):
        raise DeviceMemoryError("the train step needs 80 GiB per device (forced by the test)")


def _with_data(run: Path) -> Path:
    """The older run's job.json with entries of `add_job_data`."""
    record = read_job(run)
    (run / "job.json").write_text(json.dumps({**record, "data": OLDER_DATA}))
    return run


@pytest.mark.parametrize("enclosing_job", [False, True], ids=["trainer's job", "job around train()"])
def test_a_resume_after_a_run_that_failed_before_its_first_step_keeps_the_older_runs_data(run_copy, enclosing_job):
    """The failed run's own job (job.json moved aside by the claim, put back by `undo`) or one opened around
    `train()` (as `easytrain train` does: job.json is its record from the start)."""
    refused = RefusedMemory(args_for(_with_data(run_copy), overwrite_output_dir=True))
    with pytest.raises(DeviceMemoryError):
        if enclosing_job:
            with Job(run_copy, report_to=["none"]):
                refused.train()
        else:
            refused.train()
    failed = read_job(run_copy)
    assert failed["status"] == "failed" and failed["error"]["type"] == "DeviceMemoryError"
    BaseTrainer(args_for(run_copy, resume_from_checkpoint="latest")).train()
    resumed = read_job(run_copy)
    assert (resumed["status"], resumed["resumed_from_step"], resumed["data"]) == ("completed", 4, OLDER_DATA)


def test_a_resume_after_a_job_that_failed_before_it_began_keeps_the_older_runs_data(run_copy):
    """A failure before the trainer's loop began (the command's data loading): nothing was claimed."""
    with pytest.raises(ValueError, match="bad data"), Job(_with_data(run_copy), report_to=["none"]):
        raise ValueError("bad data (forced by the test)")
    assert read_job(run_copy)["status"] == "failed"
    BaseTrainer(args_for(run_copy, resume_from_checkpoint="latest")).train()
    assert read_job(run_copy)["data"] == OLDER_DATA


def test_the_command_reports_the_failure_then_resumes_the_older_run_with_its_data(tmp_path, monkeypatch):
    monkeypatch.setattr(logging.getLogger("easytrain"), "handlers", [])
    out = tmp_path / "run"
    assert main(["train", "--output_dir", str(out), *RUN]) == 0
    _with_data(out)
    with pytest.MonkeyPatch.context() as refusing:
        refusing.setattr(BaseTrainer, "plan_memory", RefusedMemory.plan_memory)
        assert main(["train", "--output_dir", str(out), "--overwrite_output_dir", "true", *RUN]) == FAILED_EXIT_CODE
    failed = read_job(out)
    assert failed["status"] == "failed" and failed["error"]["type"] == "DeviceMemoryError"
    assert main(["train", "--output_dir", str(out), "--resume_from_checkpoint", "latest", *RUN]) == 0
    assert read_job(out)["data"] == OLDER_DATA


def test_an_undo_before_the_runs_own_job_has_ended_gives_it_the_older_record(run_copy):
    """The failure watcher may put the older run back before the run's own job records the failure (a process ended
    for another's): the job, which opened after the claim moved the older record aside, is given that record."""
    held = claim_output_dir(args_for(_with_data(run_copy), overwrite_output_dir=True), None)
    assert not (run_copy / "job.json").exists(), "moved aside by the claim"
    running = Job(run_copy, report_to=["none"])
    with pytest.raises(RuntimeError), running:
        held.undo()
        raise RuntimeError("another process failed (forced by the test)")
    record = read_job(run_copy)
    assert record["status"] == "failed" and record[OLDER_RUN_DATA] == OLDER_DATA


def test_a_run_that_trains_after_a_failed_one_in_the_same_job_is_resumed_with_its_own_data(run_copy):
    """A job around two `train()` calls (a retry that fits): the first ends before its first step and gives the older
    run back, the second replaces that run and trains. Its checkpoints are the ones a resume continues, with its data,
    not the older run's it replaced."""
    retry = {"dataset": {"rows": 32, "source": "the retry's"}}
    with Job(_with_data(run_copy), report_to=["none"]) as running:
        with pytest.raises(DeviceMemoryError):
            RefusedMemory(args_for(run_copy, overwrite_output_dir=True)).train()
        running.add_job_data("dataset", retry["dataset"])
        BaseTrainer(args_for(run_copy, overwrite_output_dir=True, max_steps=2)).train()
    record = read_job(run_copy)
    assert (record["status"], record["data"], resumable_data(record)) == ("completed", retry, retry)


def test_an_undo_puts_back_a_linked_job_record_as_the_link(run_copy, tmp_path):
    """job.json a link to a file elsewhere: the claim moves the link aside with the older run, the failed run writes
    its own record; `undo` puts the link back, the failed run's record (with the older run's data) written through
    it, as into a plain job.json."""
    target = tmp_path / "records" / "job.json"
    target.parent.mkdir()
    os.rename(_with_data(run_copy) / "job.json", target)
    (run_copy / "job.json").symlink_to(target)
    held = claim_output_dir(args_for(run_copy, overwrite_output_dir=True), None)
    with pytest.raises(RuntimeError), Job(run_copy, report_to=["none"]):
        raise RuntimeError("the run failed before its first step (forced by the test)")
    held.undo()
    assert os.readlink(run_copy / "job.json") == str(target)
    record = read_job(target.parent)
    assert (record["status"], record[OLDER_RUN_DATA]) == ("failed", OLDER_DATA)
