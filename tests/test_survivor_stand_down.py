"""The watcher of another process's failure never ends a process that is handling a failure of its own, nor one
whose checkpoint save is still being written (`easytrain.trainers.process_failure`); times scaled down."""

import threading
import time

import pytest

from easytrain import BaseTrainer, TrainingArguments
from easytrain.checkpoint import CheckpointManager
from easytrain.errors import NonFiniteLossError
from easytrain.trainers import process_failure
from test_process_failure import BAD_BATCH, FakeClient

SAME_STOP = NonFiniteLossError("the loss was not finite at step 7")


@pytest.fixture
def survivor(monkeypatch):
    """This test process as process 1 of a 2-process run with a fake coordination service, ending (`exits` gets the
    status) within a second of logging another's failure if it makes no progress."""
    client = FakeClient()
    monkeypatch.setattr(process_failure, "coordination_client", lambda: client)
    monkeypatch.setattr(process_failure, "_runs", 0)
    monkeypatch.setattr(process_failure, "_published", {})
    monkeypatch.setattr(process_failure.jax, "process_index", lambda: 1)
    monkeypatch.setattr(process_failure, "WATCH_GRACE_SECONDS", 0.05)
    monkeypatch.setattr(process_failure, "EXIT_AFTER_SECONDS", 0.3)
    monkeypatch.setattr(process_failure, "LOOKUP_SECONDS", 0.05)
    exits: list[int] = []
    ended = threading.Event()
    monkeypatch.setattr(process_failure, "exit_process", lambda code: (exits.append(code), ended.set()))
    return client, exits, ended


def test_a_process_handling_the_same_deliberate_stop_is_not_ended(survivor):
    """Every process stops with the same error at the same step; process 0 publishes first. Process 1, still in its
    own failure handling (waiting for a save, scaled: 1.5 s against a 0.3 s bound), is not ended and raises its own
    error."""
    client, exits, ended = survivor
    step = [0]
    with pytest.raises(NonFiniteLossError), process_failure.running():
        try:
            with process_failure.watching(lambda: step[0]):
                process_failure.publish(client, 0, SAME_STOP, now=time.time() - 0.01)
                raise SAME_STOP
        except NonFiniteLossError as error:  # what the loop does with a failure of its steps
            process_failure.publish_failure(error)
            assert not ended.wait(1.5), "ended while handling its own failure"
            process_failure.reraise_naming_others(error)
    assert exits == []


def test_a_process_whose_own_failure_follows_the_log_stands_down(survivor, caplog):
    """The other's failure was logged (this process's steps went on past the grace); this process then fails itself:
    its own failure handling is not ended."""
    client, exits, ended = survivor
    with pytest.raises(ValueError), process_failure.running():
        process_failure.publish(client, 0, BAD_BATCH)
        deadline = time.monotonic() + 20
        while "cannot go on without it" not in caplog.text and time.monotonic() < deadline:
            time.sleep(0.02)
        try:
            raise ValueError("a collective gave up")
        except ValueError as error:
            process_failure.publish_failure(error)
            assert not ended.wait(1.5), "ended while handling its own failure"
            raise
    assert exits == []


def test_a_save_that_keeps_running_is_not_counted_as_no_progress(survivor):
    client, exits, ended = survivor
    saving = threading.Event()
    saving.set()
    with process_failure.running(), process_failure.watching(lambda: 0, saving=saving.is_set):
        process_failure.publish(client, 0, BAD_BATCH)
        assert not ended.wait(1.5), "ended while its save was being written"
        saving.clear()  # the save ended; nothing else moves
        assert ended.wait(20), "never ended once the save ended and nothing moved"
    assert exits == [process_failure.EXIT_CODE]


def test_a_save_is_bounded_too(survivor, monkeypatch):
    monkeypatch.setattr(process_failure, "SAVE_EXIT_AFTER_SECONDS", 0.5)
    client, exits, ended = survivor
    with process_failure.running(), process_failure.watching(lambda: 0, saving=lambda: True):
        process_failure.publish(client, 0, BAD_BATCH)
        assert ended.wait(20), "a save that never ends kept the process forever"
    assert exits == [process_failure.EXIT_CODE]


def test_the_final_wait_for_saves_counts_as_progress(survivor, monkeypatch, tmp_path):
    """A run that trained to its end waits for its saves in `shut_down`, after its steps: another process's failure
    published then does not end it while the save is being written (scaled: 1.5 s against a 0.3 s bound)."""
    client, exits, ended = survivor
    monkeypatch.setattr(process_failure.jax, "process_index", lambda: 0)  # the main process; process 1 fails
    writing = threading.Event()

    def final_wait(manager):  # save_strategy='no': only `shut_down` waits
        writing.set()
        process_failure.publish(client, 1, BAD_BATCH)
        ended.wait(1.5)
        writing.clear()

    monkeypatch.setattr(CheckpointManager, "wait_until_finished", final_wait)
    monkeypatch.setattr(CheckpointManager, "is_saving", lambda manager: writing.is_set())
    args = TrainingArguments(output_dir=str(tmp_path / "run"), max_length=32, train_batch_size=8, max_steps=2,
                             logging_steps=1, eval_strategy="no", save_strategy="no", report_to=["none"],
                             disable_progress_bar=True, save_pretrained_at_end=False, max_train_samples=32,
                             max_eval_samples=16)
    BaseTrainer(args).train()
    assert exits == []
