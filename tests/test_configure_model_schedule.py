"""A `configure_model` of one's own (the protocol's hook, returning `ConfiguredModel`) needs no private attribute for
the step to have a schedule: `setup` settles `configure_schedule(total_steps)` before it, readable there as
`self.scheduler`, and `train_function` applies and logs that. Before, only BaseTrainer's own `configure_model` set
the schedule (`self._schedule`, as a side effect), and an override's run failed while tracing the first step with
`'NoneType' object is not callable`."""

import optax
import pytest
from flax import nnx

from easytrain import ConfiguredModel
from easytrain.models import LlamaForCausalLM
from easytrain.placement import initialise_module, place_module
from easytrain.state import bind
from reward_model import RewardModel
from test_default_evaluators import RewardTrainer, tiny


class OwnOptimizerTrainer(RewardTrainer):
    """Places its reward model with an optimizer of its own; the schedule is this trainer's `configure_schedule`."""

    def configure_schedule(self, total_steps):
        return optax.constant_schedule(2e-3)

    def configure_model(self) -> ConfiguredModel:
        build = lambda: RewardModel(LlamaForCausalLM(self.model_config, rngs=nnx.Rngs(0)), nnx.Rngs(1))
        module = initialise_module(build, mesh=self.mesh, rules=self.partition_rules)
        state, shardings = place_module(module, optax.sgd(2e-3), seed=0, mesh=self.mesh)
        return ConfiguredModel(bind(module, state), state, shardings, self.mesh)


class SchedulerReader(OwnOptimizerTrainer):
    """Builds its optimizer from `self.scheduler`, the schedule the step logs, read inside `configure_model`."""

    def configure_schedule(self, total_steps):
        return optax.linear_schedule(1e-2, 0.0, total_steps)

    def configure_model(self) -> ConfiguredModel:
        build = lambda: RewardModel(LlamaForCausalLM(self.model_config, rngs=nnx.Rngs(0)), nnx.Rngs(1))
        module = initialise_module(build, mesh=self.mesh, rules=self.partition_rules)
        self.schedule_used = self.scheduler
        state, shardings = place_module(module, self.configure_optimizer(self.schedule_used), seed=0, mesh=self.mesh)
        return ConfiguredModel(bind(module, state), state, shardings, self.mesh)


def test_a_configure_model_of_ones_own_trains_with_the_configured_schedule(tmp_path):
    logs = OwnOptimizerTrainer(tiny(tmp_path, eval_strategy="no", save_strategy="no")).train()
    assert logs["learning_rate"] == pytest.approx(2e-3)


def test_configure_model_reads_the_schedule_the_step_applies_and_logs(tmp_path):
    trainer = SchedulerReader(tiny(tmp_path, eval_strategy="no", save_strategy="no", max_steps=4))
    logs = trainer.train()
    assert trainer.scheduler is trainer.schedule_used
    assert logs["learning_rate"] == pytest.approx(float(trainer.schedule_used(3)))
