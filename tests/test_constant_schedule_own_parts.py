"""A constant schedule made longer resumes without a warning only where the default `configure_schedule` and
`configure_optimizer` decide the rates: a `configure_schedule` that calls `super()` and then reads the run's length
(its own decay over `total_steps`), or a `configure_optimizer` with a schedule of its own, applies other rates in a
longer run, and the changed length is warned of as before (they resumed in silence: `super()` writes the schedule
record whatever the override returns). docs/custom_trainer.md's `TwoUpdatesPerBatch`, which returns `super()`'s
schedule of its updates, still resumes a longer constant run without a warning: its rates per update are the same."""

import logging

import optax
import pytest

from easytrain import BaseTrainer
from easytrain.trainers.resume_checks import DEFAULT_OPTIMIZER_KEY, SCHEDULE_KEY
from easytrain.trainers.schedule_checks import DEFAULT_SCHEDULE_MARK
from runs import StopAt, args_for, logged
from test_schedule_record_resume import checked, schedule_warnings
from test_several_updates_resume import TwoUpdatesPerBatch

CONSTANT = dict(save_steps=2, learning_rate=1e-2, lr_scheduler_type="constant", warmup_ratio=0.0)
LONGER = "max_steps: checkpoint 4 vs now 6"


class DecayedOverTheRun(BaseTrainer):
    """`super()`'s schedule, decayed to 0 over the run's length: a longer run applies other rates."""

    def configure_schedule(self, total_steps):
        base = super().configure_schedule(total_steps)
        return lambda step: base(step) * (1.0 - step / total_steps)


class OwnDecayingOptimizer(BaseTrainer):
    """An optimizer whose own schedule decays over `max_steps`, whatever the default schedule says."""

    def configure_optimizer(self, schedule):
        return optax.sgd(optax.linear_schedule(self.arguments.learning_rate, 0.0, self.arguments.max_steps))


def resumed_longer(trainer: type[BaseTrainer], run, caplog) -> list[str]:
    """Train `trainer` 2 of 4 steps under a constant schedule, resume it to 6; the schedule warnings."""
    trainer(args_for(run, max_steps=4, **CONSTANT), callbacks=[StopAt(2)]).train()
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="easytrain"):
        trainer(args_for(run, resume_from_checkpoint="latest", max_steps=6, **CONSTANT)).train()
    return schedule_warnings(caplog)


@pytest.mark.parametrize("trainer", [DecayedOverTheRun, OwnDecayingOptimizer])
def test_a_longer_constant_run_with_a_rate_of_the_trainers_own_is_warned_of(tmp_path, caplog, trainer):
    warned = resumed_longer(trainer, tmp_path / "run", caplog)
    assert len(warned) == 1 and LONGER in warned[0], warned


def test_super_schedule_of_the_updates_still_resumes_longer_without_a_warning(tmp_path, caplog):
    run = tmp_path / "run"
    assert resumed_longer(TwoUpdatesPerBatch, run, caplog) == []
    assert list(logged(run, "learning_rate").values()) == pytest.approx([1e-2] * 6)


def constant_info(max_steps: int, marked: bool = True, default_optimizer: bool | None = True) -> dict:
    """A run_info of a constant schedule without warmup over `max_steps` updates."""
    info = {"format_version": 1, "model_config": None,
            "arguments": {"seed": 0, "max_steps": max_steps, "learning_rate": 1e-2, "lr_scheduler_type": "constant",
                          "warmup_ratio": 0.0, "warmup_steps": 0},
            SCHEDULE_KEY: {"warmup_updates": 0, "total_updates": max_steps, **({DEFAULT_SCHEDULE_MARK: True}
                                                                                 if marked else {})}}
    return info if default_optimizer is None else {**info, DEFAULT_OPTIMIZER_KEY: default_optimizer}


def test_the_default_parts_on_both_sides_resume_longer_without_a_warning(caplog):
    assert checked(caplog, constant_info(4), constant_info(6)) == []


@pytest.mark.parametrize("stored, current", [
    (dict(marked=False), {}), ({}, dict(marked=False)),  # a record `super()` wrote under a schedule of one's own
    (dict(default_optimizer=False), {}), ({}, dict(default_optimizer=False)),  # an optimizer of one's own
    (dict(default_optimizer=None), {}),  # a checkpoint that does not say which optimizer built it
])
def test_a_side_without_the_default_parts_is_warned_of(caplog, stored, current):
    warned = checked(caplog, constant_info(4, **stored), constant_info(6, **current))
    assert len(warned) == 1 and LONGER in warned[0], warned
