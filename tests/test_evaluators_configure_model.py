"""A trainer whose `configure_model` builds its own module (no `create_module`, no `model=`) has its generation
evaluators settled on that module at set-up too: on one without init_cache()/decode(), the default exact_match is left
out with a warning and one asked for is refused, naming the metric. The check ran only where the trainer built or was
given the module, so such a run trained, then crashed at its first evaluation before any checkpoint."""


import optax
import pytest
from flax import nnx

from easytrain import ArgumentError, ConfiguredModel
from easytrain.evaluators import ExactMatch
from easytrain.generation import GenerationError
from easytrain.models import LlamaForCausalLM
from easytrain.placement import initialise_module, place_module
from easytrain.state import bind
from reward_model import RewardModel
from test_default_evaluators import RewardTrainer, check_default_exact_match_left_out, tiny


class OwnModelTrainer(RewardTrainer):
    """Builds and places its reward model in `configure_model`, past every hook the trainer builds modules with."""

    def configure_model(self) -> ConfiguredModel:
        build = lambda: RewardModel(LlamaForCausalLM(self.model_config, rngs=nnx.Rngs(0)), nnx.Rngs(1))
        module = initialise_module(build, mesh=self.mesh, rules=self.partition_rules)
        self.steps_seen = 0
        state, shardings = place_module(module, optax.sgd(self.scheduler), seed=0, mesh=self.mesh)  # `setup`'s
        return ConfiguredModel(bind(module, state), state, shardings, self.mesh)

    def train_iteration(self, state, batch):
        self.steps_seen += 1
        return super().train_iteration(state, batch)


def test_exact_match_asked_for_is_refused_at_set_up_on_the_module_configure_model_built(tmp_path):
    trainer = OwnModelTrainer(tiny(tmp_path, eval_metrics=["exact_match"]))
    with pytest.raises(ArgumentError, match="exact_match") as caught:
        trainer.train()
    assert caught.value.field == "eval_metrics" and "RewardModel" in caught.value.message
    assert trainer.steps_seen == 0 and not (tmp_path / "checkpoints").exists()


def test_a_generation_evaluator_passed_is_refused_on_the_module_configure_model_built(tmp_path):
    from easytrain.tasks.arithmetic import build_arithmetic_tokenizer

    given = ExactMatch(["1+1="], ["2"], build_arithmetic_tokenizer(), name="sums")
    trainer = OwnModelTrainer(tiny(tmp_path), evaluators=[given])
    with pytest.raises(GenerationError, match="sums.*RewardModel.*evaluators="):
        trainer.setup()


def test_the_default_exact_match_is_left_out_for_the_module_configure_model_built(tmp_path, caplog):
    trainer = OwnModelTrainer(tiny(tmp_path))
    check_default_exact_match_left_out(trainer, tmp_path, caplog)
    assert trainer.steps_seen == 2
