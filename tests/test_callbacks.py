"""Callback dispatch and early stopping, driven by a fake trainer; and `on_save`'s directory in a one-step run."""

from __future__ import annotations

import json
import logging
from types import SimpleNamespace

import pytest

from easytrain.callbacks import EVENTS, Callback, CallbackList, EarlyStopping, MissingMetricError


class Recorder(Callback):
    """Records every hook call as (name, event, args after the trainer)."""

    def __init__(self, name: str, journal: list):
        self.name, self.journal = name, journal

    def _record(self, event: str, *args) -> None:
        self.journal.append((self.name, event, args))

    def on_train_begin(self, trainer) -> None:
        self._record("on_train_begin")

    def on_train_end(self, trainer) -> None:
        self._record("on_train_end")

    def on_step_end(self, trainer, step) -> None:
        self._record("on_step_end", step)

    def on_log(self, trainer, step, logs) -> None:
        self._record("on_log", step, dict(logs))

    def on_evaluate(self, trainer, step, metrics) -> None:
        self._record("on_evaluate", step, dict(metrics))

    def on_save(self, trainer, step, checkpoint_dir) -> None:
        self._record("on_save", step, checkpoint_dir)

    def on_exception(self, trainer, error) -> None:
        self._record("on_exception", error)

    def on_job_update(self, trainer, job) -> None:
        self._record("on_job_update", dict(job))


def fake_trainer() -> SimpleNamespace:
    return SimpleNamespace(should_stop=False)


def evaluate(callback: Callback, trainer, values: list[float], metric: str = "eval_loss") -> None:
    for step, value in enumerate(values, start=1):
        callback.on_evaluate(trainer, step * 10, {metric: value, "eval_tokens": 1000.0})


# ----------------------------------------------------------------------------- dispatch


def test_base_callback_hooks_are_no_ops() -> None:
    callback, trainer = Callback(), fake_trainer()
    callback.on_train_begin(trainer)
    callback.on_step_end(trainer, 1)
    callback.on_log(trainer, 1, {"loss": 1.0})
    callback.on_evaluate(trainer, 1, {"eval_loss": 1.0})
    callback.on_save(trainer, 1, "/tmp/ckpt")
    callback.on_train_end(trainer)
    assert trainer.should_stop is False
    assert callback.state_dict() == {}


def test_callback_list_dispatches_in_order() -> None:
    journal: list = []
    callbacks = CallbackList([Recorder("a", journal)])
    callbacks.add(Recorder("b", journal))
    trainer = fake_trainer()
    callbacks.on_step_end(trainer, 3)
    callbacks.call("on_save", trainer, 3, "/out/checkpoints/3")
    callbacks.on_evaluate(trainer, 3, {"eval_loss": 0.5})
    assert journal == [
        ("a", "on_step_end", (3,)),
        ("b", "on_step_end", (3,)),
        ("a", "on_save", (3, "/out/checkpoints/3")),
        ("b", "on_save", (3, "/out/checkpoints/3")),
        ("a", "on_evaluate", (3, {"eval_loss": 0.5})),
        ("b", "on_evaluate", (3, {"eval_loss": 0.5})),
    ]


@pytest.mark.parametrize("event", EVENTS)
def test_every_event_reaches_callbacks(event: str) -> None:
    journal: list = []
    error = RuntimeError("boom")
    args = {"on_step_end": (1,), "on_log": (1, {}), "on_evaluate": (1, {}), "on_save": (1, "/c"),
            "on_exception": (error,), "on_job_update": ({"status": "running"},)}.get(event, ())
    CallbackList([Recorder("a", journal)]).call(event, fake_trainer(), *args)
    assert journal == [("a", event, args)]


def test_unknown_event_is_rejected() -> None:
    with pytest.raises(ValueError, match="on_epoch_end.*on_train_begin"):
        CallbackList().call("on_epoch_end", fake_trainer())


def test_class_instead_of_instance_is_rejected() -> None:
    with pytest.raises(TypeError, match=r"EarlyStopping\(\)"):
        CallbackList([EarlyStopping])
    with pytest.raises(TypeError, match="subclass"):
        CallbackList().add(print)


# ----------------------------------------------------------------------------- early stopping


def test_early_stopping_after_patience_without_improvement() -> None:
    callback, trainer = EarlyStopping(patience=2), fake_trainer()
    evaluate(callback, trainer, [1.0, 0.8, 0.9])
    assert trainer.should_stop is False
    evaluate(callback, trainer, [1.0, 0.8, 0.9, 0.85])
    assert trainer.should_stop is True
    assert (callback.best, callback.best_step) == (0.8, 20)
    assert "eval_loss" in callback.stop_reason and "step 40" in callback.stop_reason


def test_improvement_resets_patience() -> None:
    callback, trainer = EarlyStopping(patience=2), fake_trainer()
    evaluate(callback, trainer, [1.0, 1.1, 0.9, 1.2, 0.7, 0.8])
    assert trainer.should_stop is False
    assert callback.evaluations_without_improvement == 1


def test_min_delta_requires_a_real_improvement() -> None:
    callback, trainer = EarlyStopping(patience=2, min_delta=0.1), fake_trainer()
    evaluate(callback, trainer, [1.0, 0.95, 0.92])
    assert trainer.should_stop is True
    assert callback.best == 1.0


def test_greater_is_better() -> None:
    callback, trainer = EarlyStopping("eval_accuracy", patience=1, greater_is_better=True), fake_trainer()
    evaluate(callback, trainer, [0.5, 0.6], metric="eval_accuracy")
    assert trainer.should_stop is False
    evaluate(callback, trainer, [0.5, 0.6, 0.55], metric="eval_accuracy")
    assert trainer.should_stop is True


@pytest.mark.parametrize("metric, rising_stops", [("eval_accuracy", False), ("eval_f1", False),
                                                  ("eval_loss", True), ("eval_mse", True), ("eval_score", True)])
def test_unset_greater_is_better_follows_the_metric_name(metric: str, rising_stops: bool, caplog) -> None:
    """EarlyStopping(metric) without a direction ranks a name of known direction as metric_for_best_model does (an
    accuracy higher, a loss or an error lower): before, EarlyStopping('eval_accuracy', patience=2) stopped a run whose
    accuracy rose at every evaluation. A name of neither kind keeps the callback's lower-is-better, with a warning
    as training begins (once)."""
    callback, trainer = EarlyStopping(metric, patience=2), fake_trainer()
    with caplog.at_level(logging.WARNING, logger="easytrain"):
        callback.on_train_begin(trainer)
        callback.on_train_begin(trainer)
    evaluate(callback, trainer, [0.5, 0.6, 0.7], metric=metric)
    assert trainer.should_stop is rising_stops
    assert callback.greater_is_better is not rising_stops
    warned = [record.getMessage() for record in caplog.records]
    assert warned == (["EarlyStopping('eval_score') ranks a name of no known direction lower-is-better: pass "
                       "greater_is_better=True if a larger value is better."] if metric == "eval_score" else [])


@pytest.mark.parametrize("ranked, direction, watched, expected", [
    ("eval_score", True, "eval_score", True),  # the run's given direction, for a name of no known direction
    ("eval_score", None, "eval_score", True),  # the run's inferred one (higher), not the callback's lower
    ("eval_accuracy", False, "eval_accuracy", False),  # a given direction against the name: the run's
    ("eval_score", True, "eval_accuracy", True),  # another metric than the run's: by its own name
    ("eval_score", True, "eval_mse", False),
])
def test_an_early_stopping_given_no_direction_ranks_the_runs_metric_as_the_run_does(
        tmp_path, ranked, direction, watched, expected, caplog) -> None:
    """EarlyStopping(metric_for_best_model) given no greater_is_better ranks that metric as the run ranks its
    checkpoints and load_best_model_at_end's: before, EarlyStopping('eval_score') under greater_is_better=True
    ranked lower-is-better, stopping a run whose score rose (and warned to pass a direction the run had)."""
    from easytrain import BaseTrainer, TrainingArguments

    args = TrainingArguments(output_dir=str(tmp_path), metric_for_best_model=ranked, greater_is_better=direction,
                             report_to=["none"])
    stopper = EarlyStopping(watched, patience=2)
    trainer = BaseTrainer(args, callbacks=[stopper, EarlyStopping(watched, patience=2, greater_is_better=False)])
    assert [c.greater_is_better for c in trainer.callbacks.callbacks if isinstance(c, EarlyStopping)] \
        == [expected, False]  # a direction given to the callback is its own
    with caplog.at_level(logging.WARNING, logger="easytrain"):
        stopper.on_train_begin(fake_trainer())
    assert "EarlyStopping(" not in caplog.text


def test_greater_is_better_min_delta_requires_a_real_improvement() -> None:
    """An accuracy up by less than min_delta is no improvement, one down by less neither (min_delta is not a
    tolerance for getting worse)."""
    callback = EarlyStopping("eval_accuracy", patience=2, min_delta=0.1, greater_is_better=True)
    trainer = fake_trainer()
    evaluate(callback, trainer, [0.5, 0.45, 0.55], metric="eval_accuracy")
    assert trainer.should_stop is True and callback.best == 0.5


@pytest.mark.parametrize("greater_is_better", [False, True])
def test_the_same_value_again_is_no_improvement(greater_is_better: bool) -> None:
    """A plateau counts against patience (min_delta 0): it is not a new best."""
    callback, trainer = EarlyStopping(patience=2, greater_is_better=greater_is_better), fake_trainer()
    evaluate(callback, trainer, [1.0, 1.0, 1.0])
    assert trainer.should_stop is True and callback.best_step == 10


def test_nan_never_counts_as_improvement() -> None:
    callback, trainer = EarlyStopping(patience=2), fake_trainer()
    evaluate(callback, trainer, [float("nan"), float("nan")])
    assert trainer.should_stop is True
    assert callback.best is None


def test_missing_metric_names_the_available_ones() -> None:
    callback = EarlyStopping(metric="eval_acc")
    with pytest.raises(KeyError) as caught:
        callback.on_evaluate(fake_trainer(), 10, {"eval_loss": 1.0, "eval_perplexity": 2.7})
    assert isinstance(caught.value, MissingMetricError)
    assert str(caught.value).startswith("EarlyStopping monitors 'eval_acc'")
    assert "['eval_loss', 'eval_perplexity']" in str(caught.value)


@pytest.mark.parametrize("kwargs", [{"patience": 0}, {"min_delta": -1.0}])
def test_invalid_settings(kwargs: dict) -> None:
    with pytest.raises(ValueError):
        EarlyStopping(**kwargs)


def test_state_round_trips_through_json_for_resume() -> None:
    before = CallbackList([Callback(), EarlyStopping(patience=3)])
    evaluate(before, fake_trainer(), [1.0, 0.5, 0.6, 0.7])
    state = json.loads(json.dumps(before.state_dict()))
    assert list(state) == ["0:EarlyStopping"]  # the first EarlyStopping, wherever it is in the list
    after = CallbackList([Callback(), EarlyStopping(patience=3)])
    after.load_state_dict(state)
    trainer = fake_trainer()
    after.on_evaluate(trainer, 50, {"eval_loss": 0.8})
    assert trainer.should_stop is True


@pytest.mark.parametrize(("metric", "expected"), [("eval_accuracy", ("eval_accuracy", True)),
                                                  (None, ("eval_loss", False))])
def test_early_stopping_patience_watches_metric_for_best_model(tmp_path, metric, expected) -> None:
    """--early_stopping_patience stops on metric_for_best_model (eval_loss when unset), in its direction: not on
    eval_loss whatever the run ranks its checkpoints by."""
    from easytrain import TrainingArguments
    from easytrain.trainers.builders import default_callbacks

    args = TrainingArguments(output_dir=str(tmp_path), metric_for_best_model=metric, early_stopping_patience=2,
                             report_to=["none"])
    stopping = [c for c in default_callbacks(args) if isinstance(c, EarlyStopping)]
    assert [(c.metric, c.greater_is_better, c.patience) for c in stopping] == [(*expected, 2)]


# ----------------------------------------------------------------------------- state across resumes


class Counter(Callback):
    """Counts steps; its state is empty until it has counted one."""

    def __init__(self, steps: int = 0):
        self.steps = steps

    def state_dict(self) -> dict:
        return {"steps": self.steps} if self.steps else {}

    def load_state_dict(self, state) -> None:
        self.steps = state["steps"]  # never handed an empty state


def waiting_early_stopping() -> EarlyStopping:
    callback = EarlyStopping(patience=3)
    evaluate(callback, fake_trainer(), [1.0, 0.5, 0.6])
    return callback


def saved(*callbacks: Callback) -> dict:
    return json.loads(json.dumps(CallbackList(callbacks).state_dict()))


def progress(callback: EarlyStopping) -> tuple:
    return callback.best, callback.best_step, callback.evaluations_without_improvement


def test_a_callback_finds_its_state_when_other_callbacks_are_added_or_removed(caplog) -> None:
    state = saved(Callback(), waiting_early_stopping(), Counter(5))
    after = CallbackList([Recorder("new", []), Counter(), EarlyStopping(patience=3)])
    with caplog.at_level(logging.WARNING, logger="easytrain"):
        after.load_state_dict(state)
    assert progress(after.callbacks[2]) == (0.5, 20, 1)
    assert after.callbacks[1].steps == 5
    assert not caplog.records


def test_callbacks_of_one_class_keep_their_own_states_in_order() -> None:
    state = saved(Counter(0), Callback(), Counter(2), Counter(3))
    after = CallbackList([Counter(), Counter(), Counter(), Callback()])
    after.load_state_dict(state)
    assert [callback.steps for callback in after.callbacks[:3]] == [0, 2, 3]


def test_checkpoints_keyed_by_position_are_still_read() -> None:
    """Checkpoints written before the keys counted per class hold `<position in the list>:<class>`."""
    state = {"1:EarlyStopping": waiting_early_stopping().state_dict(), "3:Counter": {"steps": 7}}
    after = CallbackList([Counter(), EarlyStopping(patience=3)])
    after.load_state_dict(state)
    assert after.callbacks[0].steps == 7 and progress(after.callbacks[1]) == (0.5, 20, 1)


def test_a_stateful_callback_whose_state_cannot_be_matched_warns_and_starts_afresh(caplog) -> None:
    with caplog.at_level(logging.WARNING, logger="easytrain"):
        CallbackList([Counter()]).load_state_dict({"0:Counter": {"steps": 1}, "4:Counter": {"steps": 2}})
    assert "Counter" in caplog.text and "2 saved" in caplog.text and "afresh" in caplog.text
    caplog.clear()
    early = EarlyStopping()
    with caplog.at_level(logging.WARNING, logger="easytrain"):
        CallbackList([Callback(), early]).load_state_dict(saved(Counter(3)))
    assert progress(early) == (None, None, 0)
    assert "EarlyStopping" in caplog.text and "0:Counter" in caplog.text and "afresh" in caplog.text
    assert len(caplog.records) == 1, "stateless callbacks have nothing to restore"


# ----------------------------------------------------------------------------- in a run


def test_on_save_names_the_checkpoint_directory_of_its_step(tmp_path) -> None:
    """`checkpoint_dir` is `output_dir/checkpoints/<step>`, the checkpoint just started, there once the run ends (a
    callback copies or uploads it then): the directory of all checkpoints, or another step's, sends the wrong files."""
    from easytrain import BaseTrainer
    from runs import args_for

    journal: list = []
    BaseTrainer(args_for(tmp_path / "run", max_steps=1, save_steps=1), callbacks=[Recorder("r", journal)]).train()
    saved = [args for _, event, args in journal if event == "on_save"]
    assert saved == [(1, str(tmp_path / "run" / "checkpoints" / "1"))]
    assert (tmp_path / "run" / "checkpoints" / "1").is_dir()
