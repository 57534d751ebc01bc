"""`init_weights_from` a run that trains on: its save_total_limit may remove the step `latest` chose before its
run_info is read. That step is gone, not unreadable: the source is chosen again, never refused as damaged."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from easytrain.errors import CheckpointReadError
from easytrain.trainers import lora_record
from easytrain.trainers.lora_record import source_run_info


def _marked_copy(root: Path, step: int, to: int) -> None:
    """A new checkpoint `to` (as its run's next save), its run_info marked with its step."""
    shutil.copytree(root / str(step), root / str(to))
    path = root / str(to) / "run_info" / "metadata"
    path.write_text(json.dumps({**json.loads(path.read_text()), "marked": to}))


def test_a_source_step_removed_by_its_live_runs_retention_is_read_at_the_newest_step(run_copy, monkeypatch):
    """`init_weights_from` the output_dir of a run that trains on: it saves step 6 and its save_total_limit removes
    step 4 right after `latest` was resolved to 4. Before: refused as 'cannot be read ... may be corrupted'."""
    root, real = run_copy / "checkpoints", lora_record.resolve_checkpoint

    def resolved_then_superseded(output_dir, value):
        found = real(output_dir, value)
        if found[1] == 4:
            _marked_copy(root, 4, 6)
            shutil.rmtree(root / "4")
        return found

    monkeypatch.setattr(lora_record, "resolve_checkpoint", resolved_then_superseded)
    assert source_run_info(str(run_copy))["marked"] == 6


def test_a_named_source_step_removed_meanwhile_is_left_to_the_weights_reader(run_copy, monkeypatch):
    """A step named by its path and gone since: not a checkpoint any more, which the weights' reader refuses naming
    init_weights_from (as for any path that holds none)."""
    root, real = run_copy / "checkpoints", lora_record.resolve_checkpoint

    def resolved_then_removed(output_dir, value):
        found = real(output_dir, value)
        shutil.rmtree(root / "4", ignore_errors=True)
        return found

    monkeypatch.setattr(lora_record, "resolve_checkpoint", resolved_then_removed)
    assert source_run_info(str(root / "4")) == {}


def test_a_source_step_removed_on_each_choice_is_named_gone_not_damaged(run_copy, monkeypatch):
    """The source run saves again and removes the chosen step twice in a row (the second choice too): refused as gone,
    naming the steps there now, never as 'corrupted or truncated' (as it was before)."""
    root, real = run_copy / "checkpoints", lora_record.resolve_checkpoint

    def resolved_then_superseded(output_dir, value):
        found = real(output_dir, value)
        _marked_copy(root, found[1], found[1] + 2)
        shutil.rmtree(root / str(found[1]))
        return found

    monkeypatch.setattr(lora_record, "resolve_checkpoint", resolved_then_superseded)
    with pytest.raises(CheckpointReadError, match=r"init_weights_from: the checkpoint .*/6 vanished while it was read"
                                                  r".*there now: 2, 8\. Pass one of them") as refused:
        source_run_info(str(run_copy))
    assert "corrupted" not in str(refused.value)
