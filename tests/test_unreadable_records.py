"""A checkpoint's run_info that cannot be read (bad or truncated JSON, a file that cannot be opened, not a JSON
object) is refused as such, naming the checkpoint, the file and what to do, before any array is read; a record the
checkpoint does not hold (written before it was kept) is empty, as before. The readers of single records
(`stored_record` on resume, `source_run_info` for `init_weights_from`) used to turn any error into an empty record:
the checks that compare it then passed, and `init_weights_from` a LoRA checkpoint copied its adapters under another
scaling without a word. Every checkpoint is left byte-for-byte untouched."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest

from easytrain.errors import CheckpointReadError
from easytrain.trainers import lora_record, restore_checks
from easytrain.trainers.lora_record import source_run_info
from easytrain.trainers.restore_checks import stored_record
from runs import args_for, snapshot
from test_init_weights_lora import lora_run, start  # noqa: F401 (lora_run: the fixture, a LoRA source run)
from test_resume_inputs import NoCompute


def _bad_json(path: Path) -> None:
    path.write_text("{\"arguments\": ")


def _truncated(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: len(path.read_bytes()) // 2])


def _a_directory(path: Path) -> None:  # open() fails with an OSError (IsADirectoryError), as a denied read would
    path.unlink()
    path.mkdir()


def _not_an_object(path: Path) -> None:
    path.write_text("[1, 2]")


DAMAGE = {"bad_json": (_bad_json, r"run_info/metadata is not valid JSON"),
          "truncated": (_truncated, r"run_info/metadata is not valid JSON"),
          "unopenable": (_a_directory, r"IsADirectoryError"),
          "not_an_object": (_not_an_object, r"run_info is not a JSON object \(it holds a list\)")}


def _run_info_file(run: Path, step: int = 4) -> Path:
    return run / "checkpoints" / str(step) / "run_info" / "metadata"


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_an_unreadable_run_info_is_refused_by_the_record_reader(run_copy, damage):
    """Before: `stored_record` returned {} for each, and `source_run_info` too."""
    damaged, expected = DAMAGE[damage]
    damaged(_run_info_file(run_copy))
    before = snapshot(run_copy)
    root = run_copy / "checkpoints"
    with pytest.raises(CheckpointReadError) as refused:
        stored_record((root, 4), "arguments")
    message = str(refused.value)
    assert message.startswith(f"resume_from_checkpoint: the checkpoint {root / '4'} cannot be read"), message
    assert re.search(expected, message) and f"--resume_from_checkpoint {root / '2'}" in message, message
    with pytest.raises(CheckpointReadError) as refused:
        source_run_info(str(root / "4"))
    message = str(refused.value)
    assert message.startswith(f"init_weights_from: the checkpoint {root / '4'} cannot be read"), message
    assert re.search(expected, message) and f"--init_weights_from {root / '2'}" in message, message
    assert snapshot(run_copy) == before, "nothing is deleted, moved or rewritten"


def test_a_record_the_checkpoint_does_not_hold_is_empty(run_copy):
    """An older checkpoint, written before the record was kept: the checks that compare it have nothing to compare."""
    path = _run_info_file(run_copy)
    path.write_text(json.dumps({**json.loads(path.read_text()), "frozen_fingerprints": None}))
    root = run_copy / "checkpoints"
    assert stored_record((root, 4), "frozen_fingerprints") == {} and stored_record((root, 4), "not_kept") == {}
    assert stored_record(None, "arguments") == {}, "not resuming"
    assert source_run_info(str(run_copy / "no_such_run")) == {}, "not a checkpoint: its weights' reader says so"


def test_a_damaged_record_is_refused(run_copy):
    path = _run_info_file(run_copy)
    path.write_text(json.dumps({**json.loads(path.read_text()), "initial_policy": "garbled"}))
    with pytest.raises(CheckpointReadError, match=r"run_info's initial_policy is not a JSON object \(it holds a str"):
        stored_record((run_copy / "checkpoints", 4), "initial_policy")


def test_a_step_gone_since_it_was_chosen_is_refused_not_read_as_unrecorded(run_copy):
    """A live run's retention removed it: the restore that follows would say so; its checks must not pass first."""
    root = run_copy / "checkpoints"
    with pytest.raises(CheckpointReadError, match=r"checkpoint .*/3 vanished while it was read.*there now: 2, 4"):
        stored_record((root, 3), "arguments")


@pytest.mark.parametrize("reader", ["stored_record", "source_run_info"])
def test_an_error_of_the_code_is_not_taken_for_an_unreadable_checkpoint(run_copy, monkeypatch, reader):
    """A KeyError or TypeError raised by the reading code is a bug to see, not a checkpoint to pass over."""
    def broken(step_dir):
        raise KeyError("a bug in the reader")

    monkeypatch.setattr(restore_checks, "stored_run_info", broken)
    monkeypatch.setattr(lora_record, "stored_run_info", broken)
    with pytest.raises(KeyError, match="a bug in the reader"):
        if reader == "stored_record":
            stored_record((run_copy / "checkpoints", 4), "arguments")
        else:
            source_run_info(str(run_copy / "checkpoints" / "4"))


def test_one_process_that_cannot_read_the_record_raises_instead_of_deciding_otherwise(run_copy, monkeypatch):
    """Several processes read one checkpoint on a shared filesystem: one that meets a read error (here, a denied
    read) must not take the branch of an unrecorded checkpoint while the others compare the record: the checks
    differ, then the collectives, and the run hangs. It raises (and the others name it: `start_agreement`)."""
    root = run_copy / "checkpoints"
    assert stored_record((root, 4), "arguments")["max_steps"] == 4  # process 0 reads it
    real = Path.read_text

    def denied(path, *args, **kwargs):
        if path.name == "metadata" and path.parent.name == "run_info":
            raise PermissionError(13, "Permission denied", str(path))
        return real(path, *args, **kwargs)

    monkeypatch.setattr(Path, "read_text", denied)  # process 1 cannot
    with pytest.raises(CheckpointReadError, match=r"PermissionError.*Permission denied") as refused:
        stored_record((root, 4), "arguments")
    assert "corrupted" not in str(refused.value) and "permissions" in str(refused.value)  # a denial, not damage


@pytest.mark.parametrize("damage", ["bad_json", "not_an_object"])
def test_a_resume_from_an_unreadable_run_info_is_refused_when_the_trainer_is_built(run_copy, damage):
    """Before: refused by the restore, after the data was prepared, the model built (a LoRA base read, a DPO
    reference's log-probs computed and cached), with the checks before it passed on an empty record."""
    DAMAGE[damage][0](_run_info_file(run_copy))
    before = snapshot(run_copy)
    with pytest.raises(CheckpointReadError, match=rf"checkpoint {run_copy / 'checkpoints' / '4'} cannot be read"):
        NoCompute(args_for(run_copy, max_steps=6, resume_from_checkpoint="latest"))
    assert snapshot(run_copy) == before


def test_init_weights_from_a_lora_checkpoint_with_an_unreadable_run_info_is_refused(lora_run, tmp_path):  # noqa: F811
    """Before: lora_alpha 32 started from the source's adapters (trained under lora_alpha 8) without a word: the
    record that `check_source_lora` compares was read as empty, and the weights' reader never reads it."""
    source = Path(shutil.copytree(lora_run.root / "run", tmp_path / "source"))
    _bad_json(_run_info_file(source, 2))
    before = snapshot(source)
    with pytest.raises(CheckpointReadError, match=r"init_weights_from: the checkpoint .*/source/checkpoints/2 "
                                                  r"cannot be read .*run_info/metadata is not valid JSON"):
        start(lora_run, tmp_path / "run", source=source / "checkpoints" / "2", lora_alpha=32)
    assert snapshot(source) == before


def test_init_weights_from_a_checkpoint_with_an_unreadable_run_info_under_full_fine_tuning_starts(run_copy,
                                                                                                   tmp_path):
    """Full fine-tuning reads nothing of the source's run_info: its weights, checked against its fingerprint, start
    the run as before."""
    _bad_json(_run_info_file(run_copy))
    trainer = NoCompute(args_for(tmp_path / "fresh", init_weights_from=str(run_copy / "checkpoints" / "4")))
    with pytest.raises(AssertionError, match="compute started"):  # the weights were read: only the step is left
        trainer.setup()
