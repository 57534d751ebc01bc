"""A failure on one process of a multi-process run is named on every process (`easytrain.trainers.process_failure`)."""

import threading
import time

import pytest

from easytrain.data.token_range import TokenRangeError
from easytrain.errors import NonFiniteLossError
from easytrain.trainers import process_failure
from easytrain.trainers.preemption import TrainingPreempted
from easytrain.trainers.process_failure import FIRST_KEY, OtherProcessFailedError
from runs import train_on_localhost
from test_multiprocess import free_port

BAD_BATCH = TokenRangeError("A batch from `collate`", "holds a token id outside the model's vocabulary [0, 300)",
                            field="input_ids", row=0, position=0, token_id=300, vocab_size=300)
TIMEOUT = RuntimeError("UNKNOWN: Gloo context initialization failed: DEADLINE_EXCEEDED: GetKeyValue() timed out")


class FakeClient:
    """The coordination service's key-value store, as `jax.distributed`'s client reaches it."""

    def __init__(self):
        self.store: dict[str, str] = {}
        self.changed = threading.Condition()

    def key_value_set(self, key, value, allow_overwrite=False):
        if not allow_overwrite and key in self.store:
            raise RuntimeError(f"ALREADY_EXISTS: {key}")
        with self.changed:
            self.store[key] = value
            self.changed.notify_all()

    def blocking_key_value_get(self, key, timeout_in_ms):
        with self.changed:
            if not self.changed.wait_for(lambda: key in self.store, timeout_in_ms / 1000):
                raise RuntimeError(f"DEADLINE_EXCEEDED: {key}")
            return self.store[key]

    def key_value_dir_get(self, key):
        return [(name, value) for name, value in self.store.items() if name.startswith(key)]

    def key_value_delete(self, key):
        """Deletes `key` and, as the coordination service does, every key in the directory `key/`."""
        with self.changed:
            for name in [name for name in self.store if name == key or name.startswith(key.rstrip("/") + "/")]:
                del self.store[name]




def test_describe_is_one_line_with_the_type_and_cut_to_a_bound():
    assert process_failure.describe(ValueError("bad\n  value")) == "ValueError: bad value"
    assert process_failure.describe(KeyError()) == "KeyError"
    assert len(process_failure.describe(ValueError("x" * 10_000))) == process_failure.MAX_LINE


def test_a_published_failure_is_found_by_the_other_processes_only(process_0_of_2):
    client = process_0_of_2
    process_failure.publish(client, 1, BAD_BATCH, now=100.0)
    process_failure.publish(client, 2, TIMEOUT, now=130.0)  # the first-failure key stays process 1's
    assert client.store[f"{FIRST_KEY}0"] == f"1 100.000 {process_failure.describe(BAD_BATCH)}"
    found = process_failure.others_failures(client, 0, wait_seconds=0.0)
    assert found == {1: (100.0, process_failure.describe(BAD_BATCH)), 2: (130.0, process_failure.describe(TIMEOUT))}
    assert list(process_failure.others_failures(client, 1, wait_seconds=0.0)) == [2]


def test_parse_takes_keys_with_or_without_the_prefix_and_values_without_a_time():
    entries = [("easytrain/failed/2", "5.5 ValueError: x"), ("3", "no time here"), ("easytrain/failed/odd", "1 y")]
    assert process_failure.parse(entries, own_index=0) == {2: (5.5, "ValueError: x"), 3: (0.0, "no time here")}
    assert process_failure.parse(None, own_index=0) == {}


def test_the_naming_error_names_the_first_failure_first_then_this_process_own():
    error = process_failure.naming_error(TIMEOUT, 0, {2: (20.0, "RuntimeError: late"), 1: (10.0, "DataError: early")})
    assert str(error).startswith("process 1 failed: DataError: early; process 2 failed: RuntimeError: late. "
                                 "This process (0) failed after it: RuntimeError: UNKNOWN: Gloo")


def test_a_collective_error_after_another_process_failure_names_that_process(process_0_of_2):
    process_failure.publish(process_0_of_2, 1, BAD_BATCH)
    with pytest.raises(OtherProcessFailedError, match="^process 1 failed: TokenRangeError: A batch from") as raised:
        process_failure.reraise_naming_others(TIMEOUT)
    assert raised.value.__cause__ is TIMEOUT and "GetKeyValue() timed out" in str(raised.value)


def test_of_two_processes_failing_close_together_only_the_later_names_the_other(process_0_of_2, caplog, monkeypatch):
    """Each fails on its own bad batch, process 0 first: process 0 raises its own error (warning of process 1's,
    published after it), and process 1 names process 0's first."""
    monkeypatch.setattr(process_failure, "LOOKUP_SECONDS", 0.05)
    first, second = ValueError("bad batch on process 0"), ValueError("bad batch on process 1")
    process_failure.publish(process_0_of_2, 0, first, now=100.0)
    process_failure.publish(process_0_of_2, 1, second, now=100.5)
    with pytest.raises(ValueError) as raised:
        process_failure.reraise_naming_others(first)
    assert raised.value is first
    assert "process 1 failed too, after this process (0): ValueError: bad batch on process 1" in caplog.text
    monkeypatch.setattr(process_failure.jax, "process_index", lambda: 1)
    with pytest.raises(OtherProcessFailedError, match="^process 0 failed: ValueError: bad batch on process 0. "
                                                      "This process [(]1[)] failed after it: ValueError: bad batch on "
                                                      "process 1$") as raised:
        process_failure.reraise_naming_others(second)
    assert raised.value.__cause__ is second


def test_an_error_is_raised_as_it_is_when_no_other_process_failed(process_0_of_2, monkeypatch):
    monkeypatch.setattr(process_failure, "LOOKUP_SECONDS", 0.05)
    with pytest.raises(RuntimeError) as raised:
        process_failure.reraise_naming_others(TIMEOUT)
    assert raised.value is TIMEOUT


def test_an_easytrain_error_stays_itself_and_warns_of_other_failures(process_0_of_2, caplog):
    process_failure.publish(process_0_of_2, 1, BAD_BATCH)
    stop = NonFiniteLossError("non-finite loss or gradient at step 3")
    with pytest.raises(NonFiniteLossError) as raised:
        process_failure.reraise_naming_others(stop)
    assert raised.value is stop and "process 1 failed: TokenRangeError" in caplog.text
    caplog.clear()
    process_failure.publish(process_0_of_2, 1, stop)  # every process stopped alike: nothing to warn of
    with pytest.raises(NonFiniteLossError):
        process_failure.reraise_naming_others(stop)
    assert "process 1 failed" not in caplog.text


def test_a_stop_by_signal_is_neither_published_nor_renamed(process_0_of_2):
    preempted = TrainingPreempted(3, "SIGTERM", None)
    process_failure.publish_failure(preempted)
    assert process_0_of_2.store == {}
    process_failure.publish(process_0_of_2, 1, BAD_BATCH)
    with pytest.raises(TrainingPreempted):
        process_failure.reraise_naming_others(preempted)


def test_a_single_process_run_reaches_no_service():
    assert process_failure.coordination_client() is None  # the suite runs one process
    process_failure.publish_failure(TIMEOUT)
    with pytest.raises(RuntimeError) as raised:
        process_failure.reraise_naming_others(TIMEOUT)
    assert raised.value is TIMEOUT


def logged_within(caplog, text: str, seconds: float = 20.0) -> bool:
    """Whether `text` is logged before `seconds` pass (the watcher logs from its own thread)."""
    deadline = time.monotonic() + seconds
    while text not in caplog.text and time.monotonic() < deadline:
        time.sleep(0.05)
    return text in caplog.text


def test_the_watcher_logs_another_process_failure_while_this_one_still_trains(process_0_of_2, caplog, monkeypatch):
    monkeypatch.setattr(process_failure, "WATCH_GRACE_SECONDS", 0.1)
    with process_failure.watching():
        process_failure.publish(process_0_of_2, 1, BAD_BATCH)
        assert logged_within(caplog, "process 1 failed: TokenRangeError: A batch from `collate` holds a token id")
    assert not [thread for thread in threading.enumerate() if thread.name == "easytrain-failure-watch"]


def test_the_watcher_ignores_its_own_failure_one_in_the_grace_and_an_earlier_train(process_0_of_2, caplog,
                                                                                   monkeypatch):
    monkeypatch.setattr(process_failure, "WATCH_GRACE_SECONDS", 0.1)
    with process_failure.watching():
        process_failure.publish(process_0_of_2, 0, BAD_BATCH)  # this process's own
        process_failure.publish(process_0_of_2, 1, BAD_BATCH)  # not the first: not waited on
    monkeypatch.setattr(process_failure, "WATCH_GRACE_SECONDS", 60.0)
    with process_failure.watching():  # the steps end within the grace, as at a stop every process meets
        process_failure.publish(process_0_of_2, 1, BAD_BATCH)
    with process_failure.watching():  # the next train() of the job: its own keys
        time.sleep(3 * process_failure.WATCH_POLL_SECONDS)
        assert process_failure.others_failures(process_0_of_2, 0, wait_seconds=0.0) == {}
    assert "failed" not in caplog.text


def test_a_service_that_does_not_answer_is_given_up_on():
    release = threading.Event()
    assert process_failure.bounded(lambda: release.wait(30), seconds=0.05) is None
    release.set()
    assert process_failure.bounded(lambda: 1 / 0, seconds=1.0) is None
    assert process_failure.bounded(lambda: 7, seconds=1.0) == 7

FLAGS = ["--max_length", "16", "--train_batch_size", "8", "--logging_steps", "1", "--eval_strategy", "no",
         "--save_strategy", "no", "--report_to", "jsonl", "--disable_progress_bar", "--save_pretrained_at_end", "false",
         "--max_steps", "6", "--validation_split_percentage", "0",
         "--task", "tests.failing_collate_task:PastVocabularyOnProcessOne"]


@pytest.mark.slow
def test_a_failure_on_process_1_is_named_by_process_0(tmp_path, tokenizer_dir, text_lines):
    """Process 1's collate yields a token id past the vocabulary: it fails with that error, and process 0, left
    waiting in its first step's collectives, logs process 1's error at once, then fails naming it instead of only
    a timeout."""
    (train := tmp_path / "train.txt").write_text("\n".join(text_lines) + "\n")
    codes, outputs = train_on_localhost(
        [["--output_dir", str(tmp_path / "run"), "--train_file", str(train), "--tokenizer_name", tokenizer_dir,
          *FLAGS] for _ in range(2)], free_port(), timeout=240)
    assert codes[0] not in (0, None) and codes[1] not in (0, None), f"exit statuses {codes}"
    assert "outside the model's vocabulary" in outputs[1], outputs[1][-3000:]
    assert "easytrain: error: process 1 failed: TokenRangeError" in outputs[0], outputs[0][-3000:]  # its exit message
    assert "This process (0) failed after it: JaxRuntimeError" in outputs[0], outputs[0][-3000:]
    assert "This process (0) cannot go on without it" in outputs[0], outputs[0][-3000:]  # the watcher's, earlier
