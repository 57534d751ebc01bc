"""A hand-written loop's `job.json` `step`: `begin` sets where it starts, `progress_update(..., step=)` moves it on
(docs/jobs.md: a resumed job used to complete at progress 100 with `step` 10 of 20)."""

from __future__ import annotations

from pathlib import Path

import pytest
from doc_snippets import python_blocks, run_block

from easytrain.jobs import job, progress_update, read_job


def test_a_resumed_hand_written_job_advances_its_step_to_the_last(tmp_path: Path) -> None:
    seen: list[int] = []
    with job(tmp_path, min_write_interval=0) as resumed:
        resumed.begin(total_steps=20, initial_step=10)
        for step in range(11, 21):
            resumed.progress_update(100 * step / 20, step=step)
            seen.append(read_job(tmp_path)["step"])
    record = read_job(tmp_path)
    assert seen == list(range(11, 21))
    assert (record["status"], record["progress"], record["step"], record["total_steps"]) == ("completed", 100.0, 20, 20)


def test_the_module_function_takes_the_step_too_and_without_it_the_step_is_kept(tmp_path: Path) -> None:
    with job(tmp_path, min_write_interval=0):
        progress_update(50, step=5)
        assert read_job(tmp_path)["step"] == 5
        progress_update(60)
        assert read_job(tmp_path)["step"] == 5


@pytest.mark.parametrize("step", [-1, 2.5, True, "3"])
def test_a_step_that_is_not_a_count_is_refused_naming_it(tmp_path: Path, step: object) -> None:
    with job(tmp_path), pytest.raises(ValueError, match=r"progress_update's step= is the number of steps done, an "
                                                        r"int >= 0, got"):
        progress_update(10, step=step)


def test_the_docs_resume_example_ends_at_its_last_step(tmp_path: Path, monkeypatch, capsys) -> None:
    blocks = python_blocks(Path(__file__).resolve().parents[1] / "docs" / "jobs.md")
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    run_block(blocks[0], namespace)
    assert read_job(tmp_path / "runs" / "handwritten")["step"] == 20
    run_block(blocks[1], namespace)
    record = read_job(tmp_path / "runs" / "handwritten")
    assert (record["status"], record["step"], record["total_steps"]) == ("completed", 20, 20)
