"""`CheckpointManager.restore` on the checkpoints of a run that trains on (a read-only manager beside it): its
save_total_limit may remove the step being read once a newer one is saved. That step is gone, not damaged: the
refusal says so and names the steps there now, as a resume's does, instead of 'corrupted or truncated'."""

from __future__ import annotations

import shutil

import pytest
from easytrain.checkpoint import CheckpointManager
from easytrain.errors import CheckpointReadError


def test_a_step_removed_while_restore_reads_it_is_named_gone_with_the_steps_there_now(run_copy, monkeypatch):
    """The live run saves step 6 and removes step 4 right after restore checked 4's items, before its data_state
    is read. Before: 'the checkpoint .../4 cannot be read (...); it may be corrupted or truncated'."""
    root, real = run_copy / "checkpoints", CheckpointManager.check_items

    def checked_then_superseded(self, step):
        items = real(self, step)
        if (root / "4").exists():
            shutil.copytree(root / "4", root / "6")
            shutil.rmtree(root / "4")
        return items

    monkeypatch.setattr(CheckpointManager, "check_items", checked_then_superseded)
    monkeypatch.setattr(CheckpointManager, "restore_state", lambda self, step, *, abstract_state: None)
    with CheckpointManager(root, read_only=True) as manager:
        with pytest.raises(CheckpointReadError) as refused:
            manager.restore(4, abstract_state=None)
    assert "vanished while it was read" in str(refused.value) and "there now: 2, 6" in str(refused.value), refused
    assert "corrupted" not in str(refused.value), refused.value
