"""A callback whose `on_exception` raises does not hide the run's failure: every callback's `on_exception` still
runs (the job record's too, which marks `job.json` failed), the run's own error is what propagates, with the
callback's error logged and noted on it, and the checkpoint already started is complete."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from types import SimpleNamespace

import pytest

from easytrain import Callback
from easytrain.callbacks import CallbackList
from easytrain.checkpoint import CheckpointManager
from runs import FailAtSave
from test_foundation import regression_trainer
from test_trainer import tiny_args


class BrokenHandler(Callback):
    """A cleanup hook with a bug of its own."""

    def on_exception(self, trainer, error):
        raise ValueError("a bug in the cleanup hook")


class Seen(Callback):
    """Records the errors its `on_exception` is given."""

    def __init__(self):
        self.errors: list[BaseException] = []

    def on_exception(self, trainer, error):
        self.errors.append(error)


def test_every_on_exception_runs_and_the_callbacks_error_is_logged(caplog):
    seen, original = Seen(), RuntimeError("the run's failure")
    with caplog.at_level(logging.ERROR, logger="easytrain"):
        CallbackList([BrokenHandler(), seen]).on_exception(SimpleNamespace(), original)
    assert seen.errors == [original]
    assert "BrokenHandler.on_exception" in caplog.text and "a bug in the cleanup hook" in caplog.text, caplog.text
    assert any("a bug in the cleanup hook" in note for note in original.__notes__), original.__notes__


def test_call_of_on_exception_is_guarded_too():
    seen = Seen()
    CallbackList([BrokenHandler(), seen]).call("on_exception", SimpleNamespace(), error := KeyError("x"))
    assert seen.errors == [error]


def test_the_runs_error_propagates_past_a_broken_on_exception(tmp_path):
    seen = Seen()
    args = tiny_args(tmp_path, max_steps=4, save_strategy="steps", save_steps=2, save_total_limit=1)
    with pytest.raises(RuntimeError, match="a failing on_save at step 2") as raised:
        regression_trainer(args, callbacks=[FailAtSave(2), BrokenHandler(), seen]).train()
    assert seen.errors == [raised.value]
    assert raised.value.__context__ is None, "the run's error is the primary one, not a context"
    assert CheckpointManager(Path(args.output_dir) / "checkpoints").all_steps() == [2]
    job = json.loads((Path(args.output_dir) / "job.json").read_text())
    assert job["status"] == "failed" and "a failing on_save at step 2" in job["error"]["message"], job
