"""Checking that a trainer implements `TrainerProtocol` runs none of its code (no setup, no compile)."""

import pytest

from easytrain import ArgumentError, BaseTrainer, TrainerProtocol, TrainingArguments
from easytrain.cli import run
from easytrain import protocol


class CountingTrainer:
    """Every protocol member; `evaluations` counts how often a property body ran."""

    evaluations = 0

    def __init__(self, arguments):
        self._arguments = arguments

    def _count(self, value=None):
        type(self).evaluations += 1
        return value

    arguments = property(lambda self: self._count(self._arguments))
    dataset_train = property(lambda self: self._count([1.0, 2.0]))
    dataset_eval = property(lambda self: self._count([3.0]))
    model = property(lambda self: self._count())
    state = property(lambda self: self._count())
    dtype = property(lambda self: self._count())
    param_dtype = property(lambda self: self._count())
    optimizer = property(lambda self: self._count())
    scheduler = property(lambda self: self._count())

    def configure_model(self): ...
    def configure_dataloaders(self): ...
    def configure_functions(self): ...

    def train(self):
        return {"loss": float(sum(self.dataset_train))}

    def evaluate(self):
        return {"eval_loss": float(sum(self.dataset_eval))}

    def save_pretrained(self, directory):
        return directory


class BoomTrainer(CountingTrainer):
    """Its data set-up fails with an AttributeError, the way a bug inside `setup()` would."""

    @property
    def dataset_train(self):
        type(self).evaluations += 1
        raise AttributeError("boom")


class NoEvaluateNoScheduler:
    """Has everything but `evaluate` and `scheduler`."""

    def __init__(self, arguments):
        self.arguments = arguments
        self.dataset_train = self.dataset_eval = self.model = self.state = None
        self.dtype = self.param_dtype = self.optimizer = None

    def configure_model(self): ...
    def configure_dataloaders(self): ...
    def configure_functions(self): ...
    def train(self): return {}
    def save_pretrained(self, directory): return directory


def test_members_come_from_the_protocol_itself():
    assert protocol.missing_members(object()) == sorted(protocol.missing_members(object()))
    assert {"arguments", "dataset_train", "scheduler", "train", "evaluate", "save_pretrained"} <= set(
        protocol.missing_members(object()))
    assert all(hasattr(TrainerProtocol, name) for name in protocol.missing_members(object()))


def test_conformance_check_evaluates_no_property(tmp_path):
    BoomTrainer.evaluations = 0
    trainer = BoomTrainer(TrainingArguments(output_dir=str(tmp_path)))
    assert protocol.missing_members(trainer) == []
    protocol.check_implements(trainer)
    assert BoomTrainer.evaluations == 0


def test_an_error_inside_the_trainer_surfaces_as_itself(tmp_path):
    """Not as 'does not implement TrainerProtocol' (what hasattr-based isinstance reports on 3.11)."""
    BoomTrainer.evaluations = 0
    with pytest.raises(AttributeError, match="boom") as caught:
        run(TrainingArguments(task=f"{__name__}:BoomTrainer", output_dir=str(tmp_path)))
    assert not isinstance(caught.value, ArgumentError)
    assert caught.traceback[-1].name == "dataset_train"
    assert any(entry.name == "train" for entry in caught.traceback)
    assert BoomTrainer.evaluations == 1  # once, by train(); never by the check


def test_missing_members_are_named(tmp_path):
    with pytest.raises(ArgumentError, match="NoEvaluateNoScheduler.*evaluate, scheduler") as caught:
        run(TrainingArguments(task=f"{__name__}:NoEvaluateNoScheduler", output_dir=str(tmp_path)))
    assert caught.value.field == "task"
    assert protocol.missing_members(NoEvaluateNoScheduler(None)) == ["evaluate", "scheduler"]


def test_method_set_to_none_is_missing():
    trainer = NoEvaluateNoScheduler(None)
    trainer.train = None
    assert "train" in protocol.missing_members(trainer)


def test_base_trainer_conforms_without_building_anything(tmp_path, monkeypatch):
    def no_setup(self):
        raise AssertionError("the conformance check must not call setup()")

    monkeypatch.setattr(BaseTrainer, "setup", no_setup)
    trainer = BaseTrainer(TrainingArguments(output_dir=str(tmp_path), report_to=["none"]))
    assert protocol.missing_members(trainer) == []
    protocol.check_implements(trainer)


def test_cli_run_does_not_build_a_base_trainer_to_check_it(tmp_path, monkeypatch):
    built = []
    monkeypatch.setattr(BaseTrainer, "setup", lambda self: built.append("setup"))
    monkeypatch.setattr(BaseTrainer, "train", lambda self: {"loss": float(len(built))})
    monkeypatch.setattr(BaseTrainer, "evaluate", lambda self: {"eval_loss": 0.0})
    summary = run(TrainingArguments(output_dir=str(tmp_path), report_to=["none"]))
    assert built == [] and summary["train_loss"] == 0.0
