"""Training data moved since the checkpoint (the same file at another path: a job resumed on another cluster, or
after copying /scratch to /data): where the checkpoint's data position records the rows' digest, the content
decides, not the path. The same rows resume exactly; other rows behind the moved path are refused naming it; a
checkpoint without a digest still compares the path."""

import json
import logging
import shutil
from pathlib import Path

import pytest

from easytrain import ArgumentError, BaseTrainer
from easytrain.config_io import ARGUMENTS_FILE
from easytrain.trainers import resume_checks
from runs import StopAt, args_for, logged, snapshot
from test_resume_inputs import NoCompute

LINES = [" ".join(f"w{(i * 5 + j) % 17}" for j in range(14)) for i in range(48)]


def write_rows(path: Path, lines: list[str]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps({"text": line}) + "\n" for line in lines))
    return path


def file_args(output_dir, train_file, tokenizer_dir, **overrides):
    return args_for(output_dir, train_file=str(train_file), tokenizer_name=tokenizer_dir, max_train_samples=None,
                    validation_split_percentage=10, **overrides)


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tokenizer_dir) -> tuple[Path, Path, Path, Path]:
    """An unbroken 4-step run on data/a.jsonl and the same run stopped at step 2 (its checkpoint); then the file is
    moved to other/b.jsonl. (unbroken, stopped, old path, new path)"""
    root = tmp_path_factory.mktemp("moved")
    old = write_rows(root / "data" / "a.jsonl", LINES)
    BaseTrainer(file_args(root / "unbroken", old, tokenizer_dir)).train()
    BaseTrainer(file_args(root / "stopped", old, tokenizer_dir), callbacks=[StopAt(2)]).train()
    new = root / "other" / "b.jsonl"
    new.parent.mkdir()
    shutil.move(old, new)
    return root / "unbroken", root / "stopped", old, new


@pytest.fixture
def run(runs, tmp_path) -> Path:
    """This test's copy of the stopped run."""
    return Path(shutil.copytree(runs[1], tmp_path / "run"))


def resume(run, train_file, tokenizer_dir, trainer=BaseTrainer, **overrides):
    values = dict(resume_from_checkpoint="latest") | overrides
    return trainer(file_args(run, train_file, tokenizer_dir, **values))


def test_a_moved_train_file_resumes_exactly(runs, run, tokenizer_dir, caplog):
    unbroken, _, old, new = runs
    with caplog.at_level(logging.INFO, logger="easytrain"):
        trainer = resume(run, new, tokenizer_dir)
        trainer.train()
    assert trainer.resumed_data_state is not None and trainer.resumed_data_state["step"] == 2
    assert logged(run) == logged(unbroken)  # steps 3 and 4 as the unbroken run's
    named = [r.getMessage() for r in caplog.records if str(old) in r.getMessage() and str(new) in r.getMessage()]
    assert len(named) == 1 and "moved" in named[0]
    assert json.loads((run / ARGUMENTS_FILE).read_text())["train_file"] == str(new)  # a rerun reads it there


def test_allow_data_order_change_keeps_the_position_over_moved_rows(runs, run, tokenizer_dir):
    """The flag lets changes through; a moved path holding the same rows is none: the saved position is kept."""
    trainer = resume(run, runs[3], tokenizer_dir, allow_data_order_change=True)
    trainer.setup()
    assert trainer.resumed_data_state is not None and trainer.resumed_data_state["step"] == 2


def test_a_moved_and_edited_train_file_is_refused_naming_it(run, tmp_path, tokenizer_dir):
    edited = LINES.copy()
    edited[7] = " ".join(reversed(edited[7].split()))  # the same words in another order: the same row count
    new = write_rows(tmp_path / "other" / "b.jsonl", edited)
    before = snapshot(run)
    with pytest.raises(ArgumentError, match=r"^resume_from_checkpoint: the training data changed since the "
                                            r"checkpoint \(data_digest: .*train_file: checkpoint '.*a\.jsonl' vs now "
                                            r"'.*b\.jsonl'.*--allow_data_order_change") as refused:
        resume(run, new, tokenizer_dir, trainer=NoCompute).setup()
    assert "read otherwise" not in str(refused.value)  # the same field reads the file the same way
    assert snapshot(run) == before


def test_a_moved_train_file_without_a_recorded_digest_is_refused_as_before(runs, run, tokenizer_dir):
    new = runs[3]
    stored = run / "checkpoints" / "2" / "data_state" / "metadata"
    position = json.loads(stored.read_text())
    stored.write_text(json.dumps({key: value for key, value in position.items() if key != "data_digest"}))
    before = snapshot(run)
    with pytest.raises(ArgumentError, match=r"^resume_from_checkpoint: these arguments changed since the checkpoint "
                                            r".*train_file: checkpoint '.*a\.jsonl' vs now '.*b\.jsonl'.*"
                                            r"--allow_data_order_change"):
        resume(run, new, tokenizer_dir, trainer=NoCompute).setup()
    assert snapshot(run) == before


# ----------------------------------------------------------------------------- which paths count as moved


def run_info_with(**arguments) -> dict:
    defaults = dict(seed=0, train_batch_size=4, tokenizer_name="tok", model_name_or_path=None)
    return {"format_version": 1, "arguments": defaults | arguments, "model_config": None}


def test_a_moved_local_dataset_folder_is_compared_by_content(tmp_path):
    folder = tmp_path / "copied"
    folder.mkdir()
    stored, now = run_info_with(dataset_name="/scratch/gone"), run_info_with(dataset_name=str(folder))
    moved = f"dataset_name: checkpoint '/scratch/gone' vs now {str(folder)!r}"
    assert resume_checks.moved_data(stored["arguments"], now["arguments"]) == [moved]
    assert resume_checks.refuse_changes(stored, now, content_compared=True) == []
    with pytest.raises(ArgumentError, match=r"dataset_name: checkpoint '/scratch/gone'"):
        resume_checks.check_resumable(stored, now)  # no digest to compare: the path decides


@pytest.mark.parametrize("stored, now", [
    (dict(dataset_name="org/a"), dict(dataset_name="org/b")),  # a Hub name: another dataset, not a moved one
    (dict(train_file="a.jsonl"), dict(dataset_name="org/a")),  # a Hub name is not the file moved
    (dict(train_file="a.jsonl", seed=0), dict(train_file="b.jsonl", seed=1)),  # the seed still counts
    (dict(dataset_name="/data/a"), dict(train_file="b.jsonl", seed=1)),  # across fields too
])
def test_other_data_changes_are_refused_even_with_a_digest(stored, now):
    with pytest.raises(ArgumentError, match="these arguments changed since the checkpoint"):
        resume_checks.refuse_changes(run_info_with(**stored), run_info_with(**now), content_compared=True)


def test_a_refusal_beside_a_move_keeps_the_new_path_in_its_rerun_advice():
    """The rerun the refusal offers reads the checkpoint's arguments.json, which holds the old path: after a real move
    that file is gone, so the advice names the new path to keep instead of listing the move as a difference."""
    stored = run_info_with(train_file="/scratch/a.jsonl", max_length=16)
    now = run_info_with(train_file="/data/a.jsonl", max_length=12)
    with pytest.raises(ArgumentError) as refused:
        resume_checks.refuse_changes(stored, now, content_compared=True)
    message = str(refused.value)
    assert "max_length: checkpoint 16 vs now 12" in message and "train_file: checkpoint" not in message, message
    assert "--train_file /data/a.jsonl" in message and "compared by content" in message, message


# ----------------------------------------------------------------------------- moved between the two fields


def folder_args(output_dir, folder, tokenizer_dir, **overrides):
    return args_for(output_dir, dataset_name=str(folder), tokenizer_name=tokenizer_dir, max_train_samples=None,
                    validation_split_percentage=10, **overrides)


def test_a_train_file_now_in_a_dataset_name_folder_resumes_exactly(runs, run, tokenizer_dir, tmp_path, caplog):
    """The loader reads a .jsonl file the same under either field (the same rows, order and columns: the digest of
    the prepared rows agrees), so the saved position holds the same examples. It was refused by path ("train_file:
    checkpoint '...a.jsonl' vs now None")."""
    folder = tmp_path / "folder"
    shutil.copytree(runs[3].parent, folder)
    with caplog.at_level(logging.INFO, logger="easytrain"):
        trainer = BaseTrainer(folder_args(run, folder, tokenizer_dir, resume_from_checkpoint="latest"))
        trainer.train()
    assert trainer.resumed_data_state is not None and trainer.resumed_data_state["step"] == 2
    assert logged(run) == logged(runs[0])
    moved = [r.getMessage() for r in caplog.records if "moved" in r.getMessage() and str(folder) in r.getMessage()]
    assert len(moved) == 1 and "dataset_name" in moved[0] and "train_file" in moved[0], moved
    saved = json.loads((run / ARGUMENTS_FILE).read_text())
    assert (saved["dataset_name"], saved["train_file"]) == (str(folder), None)


def test_a_dataset_name_folders_file_given_as_train_file_resumes_exactly(runs, tokenizer_dir, tmp_path):
    folder = tmp_path / "folder"
    shutil.copytree(runs[3].parent, folder)
    BaseTrainer(folder_args(tmp_path / "run", folder, tokenizer_dir), callbacks=[StopAt(2)]).train()
    shutil.rmtree(folder)  # gone: the rows live on in the file
    trainer = resume(tmp_path / "run", runs[3], tokenizer_dir)
    trainer.train()
    assert trainer.resumed_data_state is not None and logged(tmp_path / "run") == logged(runs[0])


def test_a_csv_file_read_otherwise_under_the_other_field_is_refused_naming_why(tmp_path, tokenizer_dir):
    """A train_file's CSV cells are read literally; a dataset_name folder's as `datasets` infers them ('NA' is a
    missing value there, dropped): the same file gives other rows, and the refusal says so and how to keep them."""
    rows = ["text", *LINES[:20], "NA", *LINES[20:]]
    csv = tmp_path / "data" / "a.csv"
    csv.parent.mkdir()
    csv.write_text("\n".join(rows) + "\n")
    BaseTrainer(file_args(tmp_path / "run", csv, tokenizer_dir), callbacks=[StopAt(1)]).train()
    before = snapshot(tmp_path / "run")
    with pytest.raises(ArgumentError) as refused:
        NoCompute(folder_args(tmp_path / "run", csv.parent, tokenizer_dir, resume_from_checkpoint="latest")).setup()
    message = str(refused.value)
    assert "the training data changed since the checkpoint" in message, message
    assert f"train_file: checkpoint {str(csv)!r} vs now dataset_name {str(csv.parent)!r}" in message, message
    assert "read otherwise" in message and "--dataset_name none --train_file FILE" in message, message
    assert snapshot(tmp_path / "run") == before


def test_a_move_between_the_fields_keeps_the_new_source_in_the_rerun_advice():
    """The checkpoint's arguments.json names the other field: the advice unsets it, or the rerun would name two
    sources."""
    stored = run_info_with(dataset_name="/scratch/folder", max_length=16)
    now = run_info_with(train_file="/data/a.jsonl", max_length=12)
    assert resume_checks.moved_paths(stored["arguments"], now["arguments"]) == {
        "dataset_name": None, "train_file": "/data/a.jsonl"}
    with pytest.raises(ArgumentError) as refused:
        resume_checks.refuse_changes(stored, now, content_compared=True)
    message = str(refused.value)
    assert "max_length: checkpoint 16 vs now 12" in message and "dataset_name: checkpoint" not in message, message
    assert "--dataset_name none --train_file /data/a.jsonl" in message, message
