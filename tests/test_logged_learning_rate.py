"""The `learning_rate` a run logs is `configure_schedule`'s (the schedule the train step evaluates), not a rate the
optimizer holds: a `configure_optimizer` that builds its own rate instead of the `schedule` it is given trains at
that rate but logs the schedule's. docs/custom_trainer.md says so, and that `configure_schedule` is the override that
changes the rate (it is applied and logged alike)."""

import re
from pathlib import Path

import jax
import numpy as np
import optax
import pytest

from easytrain import BaseTrainer
from runs import args_for, logged

DOC = Path(__file__).resolve().parents[1] / "docs" / "custom_trainer.md"
#: Plain SGD: the update is the rate times the gradient, so the same parameters after a step mean the same rate.
PLAIN_SGD = dict(optimizer="sgd", sgd_momentum=0.0, weight_decay=0.0, max_grad_norm=0.0, learning_rate=1e-2,
                 max_steps=2, save_strategy="no", warmup_steps=0, warmup_ratio=0.0, lr_scheduler_type="constant")


class OwnRate(BaseTrainer):
    """Ignores the schedule it is given: trains at 0.5."""

    def configure_optimizer(self, schedule):
        return optax.sgd(0.5)


class OwnSchedule(BaseTrainer):
    """Changes the rate where the page says to: the schedule."""

    def configure_schedule(self, total_steps):
        return optax.constant_schedule(0.5)


def test_the_rate_logged_is_configure_schedules_and_the_page_says_so(tmp_path):
    own_rate, own_schedule = OwnRate(args_for(tmp_path / "a", **PLAIN_SGD)), OwnSchedule(args_for(tmp_path / "b",
                                                                                                   **PLAIN_SGD))
    own_rate.train()
    own_schedule.train()
    for ours, theirs in zip(jax.tree.leaves(own_rate.state.params), jax.tree.leaves(own_schedule.state.params),
                            strict=True):
        np.testing.assert_allclose(np.asarray(ours), np.asarray(theirs), rtol=1e-6)  # both trained at 0.5
    assert list(logged(tmp_path / "b", "learning_rate").values()) == [0.5, 0.5]
    assert list(logged(tmp_path / "a", "learning_rate").values()) == pytest.approx([1e-2, 1e-2])  # not applied
    page = " ".join(DOC.read_text().split())
    assert re.search(r"logged `learning_rate` is always `configure_schedule`'s[^.]*, whatever rate the optimizer "
                     r"applies", page), "docs/custom_trainer.md: the logged rate"
    assert "to change the rate, override `configure_schedule`" in page, "docs/custom_trainer.md: the override"
