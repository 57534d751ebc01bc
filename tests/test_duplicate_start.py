"""A second `easytrain train` of a run that is still training (a resubmitted or requeued job) is refused with exit
status 2 before it writes anything: the live run's `job.json` keeps saying what that run does."""

from __future__ import annotations

import fcntl
from pathlib import Path

from easytrain.cli import REFUSED_EXIT_CODE, main
from easytrain.trainers import run_lock
from easytrain.trainers.run_lock import LOCK_FILENAME

FLAGS = dict(max_length=16, train_batch_size=4, eval_batch_size=4, max_steps=4, logging_steps=1, eval_strategy="no",
             save_strategy="steps", save_steps=2, report_to="jsonl", disable_progress_bar=True,
             save_pretrained_at_end=False, max_train_samples=64, max_eval_samples=16)


def test_a_duplicate_start_is_refused_and_leaves_job_json_alone(run_copy: Path, capsys) -> None:
    job_before = (run_copy / "job.json").read_bytes()
    with open(run_copy / LOCK_FILENAME, "a+") as live:  # the live run's lock (flock is per open file)
        fcntl.flock(live, fcntl.LOCK_EX | fcntl.LOCK_NB)
        live.write("pid 4242 on trainhost\n")
        live.flush()
        argv = ["train", "--output_dir", str(run_copy), "--resume_from_checkpoint", "latest"]
        for name, value in FLAGS.items():
            argv += [f"--{name}", str(value)]
        assert main(argv) == REFUSED_EXIT_CODE
    assert (run_copy / "job.json").read_bytes() == job_before
    assert "is in use by a run that is still training (pid 4242 on trainhost" in capsys.readouterr().err


def test_the_probe_creates_nothing_and_passes_a_free_directory(tmp_path: Path) -> None:
    run_lock.refuse_if_held(tmp_path / "new")
    assert not (tmp_path / "new").exists()
    run_lock.acquire(tmp_path)
    try:
        run_lock.refuse_if_held(tmp_path)  # this process's own lock
    finally:
        run_lock.release(tmp_path)
    run_lock.refuse_if_held(tmp_path)
