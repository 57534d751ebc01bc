"""Resuming into an output_dir: another run's checkpoints there are never mixed with the resumed run's, and a
checkpoint that cannot be written fails the run instead of passing silently."""

import json
import shutil
from pathlib import Path

import pytest

from easytrain import BaseTrainer, OutputDirError
from easytrain.checkpoint import CheckpointManager, finalized_steps
from test_resume_inputs import NoCompute, args_for, snapshot


@pytest.fixture(scope="module")
def run_a(tmp_path_factory) -> Path:
    """The run to resume: a checkpoint at step 2."""
    output_dir = tmp_path_factory.mktemp("a") / "run"
    BaseTrainer(args_for(output_dir, max_steps=2)).train()
    return output_dir


@pytest.fixture(scope="module")
def run_b(tmp_path_factory) -> Path:
    """Another run (another seed) with checkpoints at steps 2 and 4."""
    output_dir = tmp_path_factory.mktemp("b") / "run"
    BaseTrainer(args_for(output_dir, seed=7)).train()
    return output_dir


@pytest.fixture
def b_copy(run_b, tmp_path) -> Path:
    return Path(shutil.copytree(run_b, tmp_path / "b"))


def _superseded_source(output_dir: Path, run_a: Path) -> Path:
    """A checkpoint set aside in output_dir by an earlier resume of an older step."""
    aside = output_dir / "superseded_checkpoints" / "20240101-000000" / "2"
    shutil.copytree(run_a / "checkpoints" / "2", aside)
    return aside


@pytest.mark.parametrize("source", ["another run", "superseded"])
def test_resuming_a_checkpoint_from_outside_into_a_directory_holding_a_run_is_refused(run_a, b_copy, source):
    """Its saves would collide with (or be mixed with) the other run's checkpoints: refused before any compute."""
    checkpoint = run_a / "checkpoints" / "2" if source == "another run" else _superseded_source(b_copy, run_a)
    before = snapshot(b_copy)
    with pytest.raises(OutputDirError, match=r"output_dir: .* checkpoints at steps \[2, 4\].*outside .*checkpoints"
                                             r".*--overwrite_output_dir.*superseded_checkpoints"):
        NoCompute(args_for(b_copy, resume_from_checkpoint=str(checkpoint)))
    assert snapshot(b_copy) == before


def test_overwrite_sets_the_other_runs_checkpoints_aside_and_the_resumed_run_saves_its_own(run_a, b_copy):
    old = {step: snapshot(b_copy / "checkpoints" / step) for step in ("2", "4")}
    source = run_a / "checkpoints" / "2"
    BaseTrainer(args_for(b_copy, overwrite_output_dir=True, resume_from_checkpoint=str(source))).train()
    assert finalized_steps(b_copy / "checkpoints") == [4]
    [aside] = (b_copy / "superseded_checkpoints").iterdir()
    assert {step: snapshot(aside / step) for step in ("2", "4")} == old, "moved, never deleted"
    with CheckpointManager(b_copy / "checkpoints") as manager:
        assert manager.read_run_info(4)["arguments"]["resume_from_checkpoint"] == str(source)
    logged = [json.loads(line)["step"] for line in (b_copy / "metrics.jsonl").read_text().splitlines()]
    assert sorted(set(logged)) == [3, 4], "the other run's logs went with it"


def test_a_resume_from_outside_into_an_empty_directory_needs_no_flag(run_a, tmp_path):
    """Restoring on another machine: the checkpoint is elsewhere, the new output_dir is empty."""
    BaseTrainer(args_for(tmp_path / "new", resume_from_checkpoint=str(run_a / "checkpoints" / "2"))).train()
    assert finalized_steps(tmp_path / "new" / "checkpoints") == [4]


def test_a_checkpoint_the_manager_refuses_to_write_fails_the_run(tmp_path, monkeypatch):
    """Never a silent "completed" without its checkpoint."""
    monkeypatch.setattr(CheckpointManager, "save", lambda self, step, **kwargs: False)
    with pytest.raises(OutputDirError, match=r"checkpoint of step 2 .*not written"):
        BaseTrainer(args_for(tmp_path / "run", max_steps=2)).train()
