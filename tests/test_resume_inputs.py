"""Bad input around resuming: each case fails before any compute, names the field and the fix, and leaves
every existing checkpoint byte-for-byte untouched. Each test changes its own copy (`run_copy`) of the run trained
once per test process (`finished_run`, tests/conftest.py)."""

import logging
import os
import re
import stat
from pathlib import Path

import pytest

from easytrain import ArgumentError, BaseTrainer, OutputDirError, placement
from easytrain.checkpoint import CheckpointNotFoundError
from easytrain.errors import CheckpointReadError
from easytrain.trainers.resume_checks import FORMAT_VERSION
from runs import args_for, snapshot  # noqa: F401  (snapshot: imported from here by other test modules)


class NoCompute(BaseTrainer):
    """Fails the test if the train step is ever built: every check must come first."""

    def configure_functions(self):
        raise AssertionError("compute started before the bad input was reported")


def resume(output_dir, **overrides):
    return NoCompute(args_for(output_dir, max_steps=6, resume_from_checkpoint="latest", **overrides))


def test_mismatched_model_config_on_resume(run_copy):
    before = snapshot(run_copy)
    with pytest.raises(ArgumentError, match=r"model_config.*hidden_size: checkpoint 128 vs now 256.*new output_dir"):
        resume(run_copy, model_config="small").setup()
    assert snapshot(run_copy) == before


@pytest.mark.parametrize("change", [dict(seed=1), dict(train_batch_size=8), dict(max_train_samples=32)])
def test_data_order_changes_are_refused_unless_allowed(run_copy, change, caplog):
    before = snapshot(run_copy)
    field = next(iter(change))
    with pytest.raises(ArgumentError, match=rf"resume_from_checkpoint.*{field}.*--allow_data_order_change"):
        resume(run_copy, **change).setup()
    assert snapshot(run_copy) == before
    trainer = BaseTrainer(args_for(run_copy, max_steps=6, resume_from_checkpoint="latest",
                                   allow_data_order_change=True, **change))
    with caplog.at_level(logging.WARNING, logger="easytrain"):
        trainer.setup()
    assert int(trainer.state.step) == 4 and trainer.resumed_data_state is None  # old position is meaningless now
    assert re.search(rf"resuming with changed settings \({field}: .*\): allow_data_order_change is set",
                     caplog.text), "the change let through is said, not passed over in silence"


class WithTeacher(NoCompute):
    """A method whose resume must refuse another teacher: it records it in `run_info()['task_arguments']`."""

    def run_info(self):
        return {**super().run_info(), "task_arguments": {"teacher_path": "teachers/b"}}


def test_a_task_setting_recorded_in_run_info_is_refused_naming_it_not_as_data_order(run_copy):
    before = snapshot(run_copy)
    with pytest.raises(ArgumentError, match=r"teacher_path: checkpoint None vs now 'teachers/b'") as refused:
        WithTeacher(args_for(run_copy, max_steps=6, resume_from_checkpoint="latest")).setup()
    assert "task's own settings" in str(refused.value) and "data order" not in str(refused.value)
    assert snapshot(run_copy) == before


def test_an_incomplete_newer_checkpoint_is_set_aside_and_its_step_saved_again(run_copy):
    """`latest` skips a step directory without its state (a damaged copy, a lost file system write), resumes the
    one before, and moves the broken one aside like any newer checkpoint: the continued run saves that step."""
    import shutil

    from easytrain.checkpoint import finalized_steps

    shutil.rmtree(run_copy / "checkpoints" / "4" / "state")
    trainer = BaseTrainer(args_for(run_copy, max_steps=6, resume_from_checkpoint="latest"))
    trainer.train()
    assert finalized_steps(run_copy / "checkpoints") == [2, 4, 6]  # step 4 saved again, complete
    [moved] = (run_copy / "superseded_checkpoints").iterdir()
    assert sorted(p.name for p in (moved / "4").iterdir()) and not (moved / "4" / "state").exists()


@pytest.mark.parametrize("change, stored", [(dict(optimizer="sgd"), "'adamw'"), (dict(param_dtype="bfloat16"),
                                                                                 "'float32'")])
def test_another_optimizer_or_parameter_dtype_is_refused_by_name(run_copy, change, stored):
    field = next(iter(change))
    before = snapshot(run_copy)
    with pytest.raises(ArgumentError, match=rf"^{field}: .*checkpoint {stored}.*init_weights_from"):
        resume(run_copy, **change).setup()
    assert snapshot(run_copy) == before


def test_a_state_mismatch_lists_a_few_keys_and_counts_the_rest():
    from easytrain.checkpoint import CheckpointMismatchError

    error = CheckpointMismatchError([f"opt_state.{i}" for i in range(70)], [], {"params.w": ("f32[2]", "bf16[2]")})
    assert len(str(error).splitlines()) < 15 and "and 62 more" in str(error) and "params.w" in str(error)


def test_directory_that_is_not_a_checkpoint(run_copy, tmp_path):
    not_a_checkpoint = tmp_path / "notes"
    not_a_checkpoint.mkdir()
    (not_a_checkpoint / "README.txt").write_text("just some files")
    (not_a_checkpoint / "7").mkdir()  # looks like a step directory but holds no checkpoint
    with pytest.raises(CheckpointNotFoundError, match=r"resume_from_checkpoint=.*notes.*not a complete checkpoint"):
        NoCompute(args_for(tmp_path / "fresh", resume_from_checkpoint=str(not_a_checkpoint)))


def _largest_array_file(step_dir: Path) -> Path:
    return max((p for p in (step_dir / "state").rglob("*") if p.is_file() and "/d/" in str(p)),
               key=lambda p: p.stat().st_size)


@pytest.mark.parametrize("damage", ["overwrite", "truncate", "metadata"])
def test_corrupted_checkpoint_file(run_copy, damage):
    step_dir = run_copy / "checkpoints" / "4"
    target = _largest_array_file(step_dir)
    data = bytearray(target.read_bytes())
    if damage == "overwrite":  # same size, garbage in the middle: only the fingerprint notices
        data[len(data) // 3: len(data) // 3 + 512] = os.urandom(512)
        target.write_bytes(bytes(data))
    elif damage == "truncate":
        target.write_bytes(bytes(data[: len(data) // 2]))
    else:
        (step_dir / "state" / "_METADATA").write_text("{not json")
    before = snapshot(run_copy)
    with pytest.raises(CheckpointReadError, match=r"resume_from_checkpoint: the checkpoint .*/4 cannot be read"
                       r".*resume from an earlier one.*checkpoints/2") as refused:
        resume(run_copy).setup()
    assert snapshot(run_copy) == before
    assert "bound method" not in str(refused.value)  # the reader's innermost reason, not a wrapper's repr
    if damage == "truncate":
        assert re.search(r"\"(params|opt_state)\.[\w.]+/", str(refused.value)), "names the unreadable array"
    if damage == "metadata":
        assert "4/state/_METADATA is not valid JSON" in str(refused.value), "names the file that is not JSON"


def test_resume_restores_into_the_abstract_state_without_initialising(run_copy, monkeypatch):
    def no_init(*args, **kwargs):
        raise AssertionError("a resumed run must not initialise weights only to overwrite them")

    monkeypatch.setattr(placement, "create_state", no_init)
    monkeypatch.setattr(placement, "initialise_module", no_init)
    trainer = BaseTrainer(args_for(run_copy, max_steps=6, resume_from_checkpoint="latest"))
    trainer.setup()
    assert int(trainer.state.step) == 4 and trainer.resumed_data_state["step"] == 4


@pytest.fixture
def read_only_dir(tmp_path) -> Path:
    """A directory this process cannot create files in (root ignores permission bits, so use /sys)."""
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(stat.S_IRUSR | stat.S_IXUSR)
    try:
        (locked / "probe").write_text("")
    except OSError:
        yield locked
        locked.chmod(stat.S_IRWXU)
        return
    locked.chmod(stat.S_IRWXU)
    if not Path("/sys").is_dir():
        pytest.skip("no read-only location available to this user")
    yield Path("/sys")


def test_output_dir_on_a_read_only_path(read_only_dir):
    with pytest.raises(OutputDirError, match=r"output_dir: cannot write to .*choose a writable --output_dir"):
        NoCompute(args_for(read_only_dir / "easytrain-run"))


def test_resuming_an_older_step_sets_newer_checkpoints_aside(run_copy):
    newer = snapshot(run_copy / "checkpoints" / "4")
    trainer = BaseTrainer(args_for(run_copy, resume_from_checkpoint=str(run_copy / "checkpoints" / "2")))
    trainer.setup()
    assert snapshot(run_copy / "checkpoints" / "4") == newer, "nothing moves before the run passed its checks"
    trainer.train()  # continues from 2 and saves its own step 4 (it would be refused with the old 4 in place)
    aside = list((run_copy / "superseded_checkpoints").glob("*/4"))
    assert len(aside) == 1 and snapshot(aside[0]) == newer, "the newer checkpoint is moved, never deleted"
    assert (run_copy / "checkpoints" / "4").is_dir()


@pytest.mark.parametrize("run_info, expected", [
    ({}, r"records no format_version and no arguments"),
    ({"format_version": 99, "arguments": {}, "model_config": None}, r"format_version 99.*newer easytrain.*reads 1"),
    ({"format_version": FORMAT_VERSION + 1, "arguments": {}, "model_config": None},
     rf"format_version {FORMAT_VERSION + 1}.*newer easytrain.*reads {FORMAT_VERSION}"),  # the next one already
])
def test_a_checkpoint_whose_run_info_cannot_be_checked_is_refused(run_copy, run_info, expected):
    """A run_info without the fields a resume checks (damaged, hand-edited, another tool's) or from a newer
    format is refused by name, not read as a data-order change that --allow_data_order_change would let
    through unchecked."""
    import json

    for step in (2, 4):
        (run_copy / "checkpoints" / str(step) / "run_info" / "metadata").write_text(json.dumps(run_info))
    before = snapshot(run_copy)
    for allow in (False, True):
        with pytest.raises(ArgumentError, match=rf"resume_from_checkpoint.*{expected}.*init_weights_from"):
            resume(run_copy, allow_data_order_change=allow).setup()
    assert snapshot(run_copy) == before
