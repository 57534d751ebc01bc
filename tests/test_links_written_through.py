"""A run's files that are links to another disk (`metrics.csv`, `job.json`, `arguments.json` kept elsewhere) stay
links when the run rewrites them: the file the link leads to is replaced, atomically, in its own directory
(`sinks.replace_through_link`), so the run's next writes reach it rather than a plain file left in output_dir."""

import csv
import os
import threading
from pathlib import Path

import pytest

from easytrain.config_io import load_arguments, save_arguments
from easytrain.jobs import Job, read_job
from easytrain.sinks import CsvSink, write_json_atomically

from runs import args_for


def _link_to_elsewhere(run: Path, name: str, content: str | None = None) -> Path:
    """`run/name` made a link to `<run>/../scratch/name` (with `content`, where given), which is returned."""
    target = run.parent / "scratch" / name
    target.parent.mkdir(parents=True, exist_ok=True)
    if content is not None:
        target.write_text(content)
    run.mkdir(exist_ok=True)
    (run / name).symlink_to(target)
    return target


def test_a_resume_rewrites_a_linked_csv_through_its_link(tmp_path):
    """The CSV of a resumed run drops its rows past the step resumed, and widens its header for a new metric: both
    rewrite the file the link leads to, and the rows written next reach it."""
    run = tmp_path / "run"
    target = _link_to_elsewhere(run, "metrics.csv")
    older = CsvSink(target, initial_step=0)
    for step in (1, 2, 3, 4):
        older.write(step, "train", {"loss": 1.0})
    older.close()
    resumed = CsvSink(run / "metrics.csv", initial_step=2)
    resumed.write(3, "train", {"loss": 0.5})
    resumed.write(3, "eval", {"eval_loss": 0.7})  # a new column: the whole file is rewritten
    resumed.close()
    assert os.readlink(run / "metrics.csv") == str(target)
    rows = list(csv.DictReader(target.open()))
    assert [(row["step"], row["split"], row["eval_loss"]) for row in rows] == [
        ("1", "train", ""), ("2", "train", ""), ("3", "train", ""), ("3", "eval", "0.7")]
    assert sorted(p.name for p in target.parent.iterdir()) == ["metrics.csv"], "no temporary file left there"


def test_the_job_record_and_the_arguments_are_written_through_their_links(tmp_path):
    run = tmp_path / "run"
    record = _link_to_elsewhere(run, "job.json", "{}")
    arguments = _link_to_elsewhere(run, "arguments.json", "{}")
    with Job(run, report_to=["none"], enabled=True) as running:
        running.add_job_data("rows", 64)
    save_arguments(args_for(run, max_steps=3), run)
    assert (os.readlink(run / "job.json"), os.readlink(run / "arguments.json")) == (str(record), str(arguments))
    assert read_job(run)["status"] == "completed" and read_job(record.parent)["data"] == {"rows": 64}
    assert load_arguments(arguments).max_steps == 3


def test_a_write_through_a_link_into_a_directory_that_is_gone_names_the_link(tmp_path):
    (tmp_path / "job.json").symlink_to(tmp_path / "unmounted" / "job.json")
    with pytest.raises(FileNotFoundError, match=r"job.json links to '.*unmounted/job.json', whose directory does not"):
        write_json_atomically(tmp_path / "job.json", {"status": "queued"})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["job.json"]


def test_two_threads_writing_one_record_at_once_each_replace_it_whole(tmp_path, monkeypatch):
    """The failure watcher's thread may write job.json (`HeldRun.undo` giving the job the older run's data) while
    the main thread does: each writes its own temporary file, so neither renames the other's away."""
    replace, second_done = os.replace, threading.Event()

    def first_waits_for_the_second(source, destination):
        if threading.current_thread() is not threading.main_thread():
            second_done.wait(5)
        return replace(source, destination)

    monkeypatch.setattr(os, "replace", first_waits_for_the_second)
    errors = []
    first = threading.Thread(target=lambda: _written(tmp_path / "job.json", {"by": "watcher"}, errors))
    first.start()
    while first.is_alive() and not any(p.name.endswith(".tmp") for p in tmp_path.iterdir()):  # the watcher's written
        threading.Event().wait(0.001)
    _written(tmp_path / "job.json", {"by": "main"}, errors)
    second_done.set()
    first.join()
    assert errors == [] and read_job(tmp_path)["by"] == "watcher"


def _written(path: Path, record: dict, errors: list) -> None:
    try:
        write_json_atomically(path, record)
    except OSError as error:
        errors.append(error)
