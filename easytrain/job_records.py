"""Reading a job record (`output_dir/job.json`) for the run that comes next: the record itself, and the `data` a resume
keeps. A job that ended before it trained (before it began, or with the claim of output_dir given back:
`trainers.held_run`) left the older run in place: its record keeps that run's `data` (`OLDER_RUN_DATA`), which a
resume of that run takes instead of the failed job's own."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from easytrain.sinks import write_json_atomically

JOB_FILENAME = "job.json"

#: The record's key for the `data` of the older run a job left in place, having ended before it trained (before it
#: began, or with the claim of output_dir given back: `held_run`): a resume of that run keeps those entries.
OLDER_RUN_DATA = "older_run_data"


def read_job(output_dir: str | os.PathLike) -> dict[str, Any] | None:
    """The job record of a run directory, or None when there is none (or it cannot be parsed)."""
    return read_record(Path(output_dir) / JOB_FILENAME)


def read_record(path: Path) -> dict[str, Any] | None:
    """The job record at `path` (one moved aside by a claim, too), or None where it cannot be read."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def resumable_data(record: Mapping[str, Any]) -> dict[str, Any]:
    """The `data` a resume of the run recorded in `record` keeps: the older run's (`OLDER_RUN_DATA`) where the job of
    `record` ended before it trained, leaving that run in place; else the record's own."""
    older = record.get(OLDER_RUN_DATA)
    return dict(older if older is not None else record.get("data") or {})


def keep_older_run_data(output_dir: Path, older: Mapping[str, Any] | None) -> None:
    """The failed run's job.json in `output_dir` (its job has ended) keeps the data of `older`, the record of the run
    put back, for a resume of that run (`OLDER_RUN_DATA`); its status and error stay as they are."""
    record = read_job(output_dir)
    if record is not None and older is not None:
        write_json_atomically(output_dir / JOB_FILENAME, {**record, OLDER_RUN_DATA: resumable_data(older)})
