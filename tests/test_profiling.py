"""`profile_steps`: a jax.profiler trace of the chosen steps, written beside the run's TensorBoard logs, that
changes nothing about training and is written (and stopped) however the run ends."""

import gzip
import json
import logging
import socket
from pathlib import Path

import jax
import pytest

from easytrain import BaseTrainer, Callback, TrainingArguments, profiling
from easytrain.errors import ArgumentError
from runs import logged

RUN = dict(max_length=32, train_batch_size=8, max_steps=5, logging_steps=1, eval_strategy="no", save_strategy="no",
           report_to=["jsonl"], disable_progress_bar=True, save_pretrained_at_end=False, max_train_samples=64,
           max_eval_samples=8)
ONE_LAYER = dict(model_type="llama", vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                 num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64)


def traces(output_dir) -> list[Path]:
    """The run directories of the traces written under `output_dir`, oldest first."""
    return sorted((Path(output_dir) / "tensorboard" / "plugins" / "profile").glob("*"))


def traced_steps(trace: Path) -> list[int]:
    """The step numbers of the "train" step annotations in a trace's Perfetto file."""
    (perfetto,) = trace.glob("perfetto_trace.json.gz")
    events = json.loads(gzip.decompress(perfetto.read_bytes()))["traceEvents"]
    return sorted(int(event["args"]["step_num"]) for event in events
                  if event.get("name") == profiling.STEP_NAME and event.get("ph") == "X")


def device_work_of(trace: Path) -> set[str]:
    """The XLA programs whose kernels ran inside the trace."""
    (perfetto,) = trace.glob("perfetto_trace.json.gz")
    events = json.loads(gzip.decompress(perfetto.read_bytes()))["traceEvents"]
    return {event["args"]["hlo_module"] for event in events if "hlo_module" in event.get("args", {})}


@pytest.fixture(scope="module")
def unprofiled(tmp_path_factory) -> dict[int, float]:
    output_dir = tmp_path_factory.mktemp("unprofiled")
    BaseTrainer(TrainingArguments(output_dir=str(output_dir), **RUN)).train()
    return logged(output_dir)


def test_the_chosen_steps_are_traced_and_training_is_unchanged(tmp_path, unprofiled):
    BaseTrainer(TrainingArguments(output_dir=str(tmp_path), profile_steps=2, profile_start_step=3, **RUN)).train()
    (trace,) = traces(tmp_path)
    assert list(trace.glob("*.xplane.pb")), "TensorBoard's profile plugin reads the xplane file"
    assert traced_steps(trace) == [3, 4]
    assert any("train_step" in module for module in device_work_of(trace)), "the steps' device work is in it"
    assert logged(tmp_path) == unprofiled, "the same losses, to the bit"


def test_a_run_that_ends_inside_the_window_writes_what_it_traced(tmp_path):
    BaseTrainer(TrainingArguments(output_dir=str(tmp_path), profile_steps=10, profile_start_step=4, **RUN)).train()
    (trace,) = traces(tmp_path)
    assert traced_steps(trace) == [4, 5]


def test_a_run_failing_inside_the_window_writes_its_trace_and_stops_the_profiler(tmp_path):
    class FailAtFour(Callback):
        def on_step_end(self, trainer, step):
            if step == 4:
                raise RuntimeError("failing on purpose")

    trainer = BaseTrainer(TrainingArguments(output_dir=str(tmp_path), profile_steps=3, profile_start_step=3, **RUN),
                          callbacks=[FailAtFour()])
    with pytest.raises(RuntimeError, match="on purpose"):
        trainer.train()
    (trace,) = traces(tmp_path)
    assert traced_steps(trace) == [3, 4]
    jax.profiler.start_trace(str(tmp_path / "after"))  # raises if the run had left its trace running
    jax.profiler.stop_trace()


def test_a_trace_already_running_is_left_alone_with_a_warning(tmp_path, caplog):
    class UsersOwnTrace(Callback):
        """The user's trace, started after step 2, just before the window (steps 3-4) opens: a trace over the
        whole run would record its compilation too, and take far longer to write."""

        def on_step_end(self, trainer, step):
            if step == 2:
                jax.profiler.start_trace(str(tmp_path / "users_own"))

    trainer = BaseTrainer(TrainingArguments(output_dir=str(tmp_path / "run"), profile_steps=2, **RUN),
                          callbacks=[UsersOwnTrace()])
    try:
        with caplog.at_level(logging.WARNING, logger="easytrain"):
            trainer.train()
    finally:
        jax.profiler.stop_trace()  # raises if the run had stopped the user's trace
    assert "not tracing steps 3-4" in caplog.text
    assert not traces(tmp_path / "run")
    assert list((tmp_path / "users_own").rglob("*.xplane.pb"))


def test_a_resumed_run_traces_what_is_left_of_the_window(tmp_path):
    class StopAtThree(Callback):
        def on_step_end(self, trainer, step):
            trainer.should_stop = step == 3

    # The resumed run's first step, traced, includes tracing and compiling the step: every Python call of that
    # is in the trace, written out as Perfetto JSON at its end; one narrow layer makes it a third smaller (5.9 MB).
    (tmp_path / "config.json").write_text(json.dumps(ONE_LAYER))
    checkpointed = {**RUN, "save_strategy": "steps", "save_steps": 100, "model_config": str(tmp_path / "config.json")}
    BaseTrainer(TrainingArguments(output_dir=str(tmp_path), **checkpointed), callbacks=[StopAtThree()]).train()
    assert not traces(tmp_path)
    BaseTrainer(TrainingArguments(output_dir=str(tmp_path), resume_from_checkpoint="latest", profile_steps=2,
                                  profile_start_step=3, **checkpointed)).train()
    (trace,) = traces(tmp_path)
    assert traced_steps(trace) == [4]


@pytest.mark.parametrize("field, value, message", [
    ("profile_steps", -1, "number of steps to trace"),
    ("profile_start_step", 0, "step number >= 1"),
])
def test_meaningless_values_are_refused(tmp_path, field, value, message):
    with pytest.raises(ArgumentError, match=message) as raised:
        TrainingArguments(output_dir=str(tmp_path), **{**RUN, field: value})
    assert raised.value.field == field


def test_a_window_past_max_steps_is_refused(tmp_path):
    with pytest.raises(ArgumentError, match=r"past the run's last step \(5\).*\[1, 5\]") as raised:
        TrainingArguments(output_dir=str(tmp_path), profile_steps=2, profile_start_step=6, **RUN)
    assert raised.value.field == "profile_start_step"
    TrainingArguments(output_dir=str(tmp_path), profile_steps=0, profile_start_step=6, **RUN)  # no trace: no check


def test_a_window_past_the_last_epoch_is_refused_before_any_compute(tmp_path):
    args = TrainingArguments(output_dir=str(tmp_path), **{**RUN, "max_steps": 0, "num_train_epochs": 1},
                             profile_steps=2, profile_start_step=1000)
    trainer = BaseTrainer(args)
    trainer.configure_model = lambda: pytest.fail("the model was built before the window was checked")
    with pytest.raises(ArgumentError, match=r"past the run's last step \(8\)"):
        trainer.train()


def test_each_process_of_several_writes_its_own_trace_directory():
    assert profiling.trace_dir("out", 0, 1) == Path("out/tensorboard")
    assert profiling.trace_dir("out", 1, 2) == Path("out/tensorboard/process_1")


def test_a_trace_that_cannot_be_written_is_logged_and_training_goes_on(tmp_path, monkeypatch, caplog):
    stop = jax.profiler.stop_trace

    def failing_stop():
        stop()  # the profiler stops; writing its files fails
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(jax.profiler, "stop_trace", failing_stop)
    with caplog.at_level(logging.ERROR, logger="easytrain"):
        BaseTrainer(TrainingArguments(output_dir=str(tmp_path), profile_steps=2, profile_start_step=2, **RUN)).train()
    assert "the trace of steps 2-3 could not be written" in caplog.text and "No space left" in caplog.text
    assert logged(tmp_path).keys() == {1, 2, 3, 4, 5}, "every step trained and logged"


def traced_by_fakes(tmp_path, monkeypatch, others: dict[str, str]) -> Path:
    """A `StepProfiler` over `tmp_path/tb` whose stop writes this host's trace in `plugins/profile/ours/` while
    another run writes, meanwhile, each file of `others` (`folder/name`), then takes back what it wrote."""
    directory = tmp_path / "tb"

    def stop() -> None:
        for where in ("ours/" + socket.gethostname() + ".xplane.pb", "ours/perfetto_trace.json.gz", *others):
            (directory / "plugins" / "profile" / where).parent.mkdir(parents=True, exist_ok=True)
            (directory / "plugins" / "profile" / where).write_text(others.get(where, "ours"))

    monkeypatch.setattr(jax.profiler, "start_trace", lambda *args, **kwargs: None)
    monkeypatch.setattr(jax.profiler, "stop_trace", stop)
    profiler = profiling.StepProfiler(directory, 1, 1)
    profiler.before_step(1)
    profiler.stop()
    profiler.take_back()
    return directory / "plugins" / "profile"


def test_taking_back_a_trace_removes_this_runs_files_and_the_folders_it_made(tmp_path, monkeypatch):
    assert not (traced_by_fakes(tmp_path, monkeypatch, {})).parent.parent.exists()


@pytest.mark.parametrize("other", ["ours/otherhost.xplane.pb", "theirs/otherhost.xplane.pb"])
def test_taking_back_a_trace_leaves_one_another_run_wrote_meanwhile(tmp_path, monkeypatch, other):
    """Another run writing a trace into a shared (linked) tensorboard/ while this one's stop writes: in the same
    second (jax names the folder by the time: the same folder) or in another folder; either stays as written."""
    runs = traced_by_fakes(tmp_path, monkeypatch, {other: "theirs"})
    assert (runs / other).read_text() == "theirs"
