"""The model switches (`scan_layers`, `remat_policy`, `attention_implementation`) reach a Llama wrapped inside the
trainer's module: a wrapper built on `super().create_module()` gets the layout the arguments ask for (its Llama is
built stacked while initialising), and a switch no submodule has is refused by name."""

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from easytrain import ArgumentError, BaseTrainer, LossOutput, TrainingArguments
from easytrain.models import LlamaForCausalLM
from easytrain.trainers.switches import apply_switches
from model_configs import tiny_config
from reward_model import RewardModel


class ScorerTrainer(BaseTrainer):
    token_fields = ()

    def create_module(self) -> nnx.Module:
        return RewardModel(super().create_module(), nnx.Rngs(self.arguments.seed + 1))

    def collate(self, rows, example_ids):
        ids = np.asarray(rows["input_ids"], np.int32)[:, :-1]
        return {"ids": ids, "weight": (example_ids >= 0).astype(np.float32), "example_id": example_ids}

    def count_tokens(self, batch) -> int:
        return int(batch["ids"].size)

    def compute_loss(self, model, batch, rng, train, frozen):
        return LossOutput(jnp.sum(model(batch["ids"]) ** 2 * batch["weight"]), jnp.sum(batch["weight"]), {})

    def compute_metrics(self, predictions, batch):
        return {}


def tiny(tmp_path, **overrides) -> TrainingArguments:
    values = dict(output_dir=str(tmp_path), max_length=16, train_batch_size=4, max_steps=1, logging_steps=1,
                  eval_strategy="no", save_strategy="no", report_to=["none"], disable_progress_bar=True,
                  save_pretrained_at_end=False, max_train_samples=16, max_eval_samples=8)
    return TrainingArguments(**{**values, **overrides})


@pytest.mark.parametrize("scan", [False, True])
def test_a_wrapped_llama_takes_the_layout_the_arguments_ask_for(tmp_path, scan):
    trainer = ScorerTrainer(tiny(tmp_path, scan_layers=scan))
    trainer.setup()
    assert trainer.model.llama.scan_layers is scan
    assert ("stacked" in trainer.state.params["llama"]["layers"]) is scan


def _scorer() -> RewardModel:
    with nnx.use_eager_sharding(False):
        return RewardModel(LlamaForCausalLM(tiny_config(num_hidden_layers=2), rngs=nnx.Rngs(0)), nnx.Rngs(1))


def test_every_switch_reaches_the_submodule_that_has_it(tmp_path):
    scorer = _scorer()
    args = tiny(tmp_path, scan_layers=True, remat_policy="full", attention_implementation="dot_product_attention")
    apply_switches(scorer, args, "cpu")
    assert scorer.llama.scan_layers and scorer.llama.remat == "full"
    assert scorer.llama.attention_implementation == "dot_product_attention"
    apply_switches(scorer, tiny(tmp_path), "cpu")  # the defaults are set too: the wrapped Llama unstacks
    assert not scorer.llama.scan_layers and scorer.llama.remat == "none"


def test_a_switch_no_submodule_has_is_refused_by_name(tmp_path):
    with nnx.use_eager_sharding(False):
        plain = nnx.Sequential(nnx.Linear(4, 4, rngs=nnx.Rngs(0)))
    with pytest.raises(ArgumentError, match="scan_layers: Sequential has no `scan_layers` attribute") as caught:
        apply_switches(plain, tiny(tmp_path, scan_layers=True), "cpu")
    assert caught.value.field == "scan_layers"
    apply_switches(plain, tiny(tmp_path), "cpu")  # the defaults ask for nothing


class OwnBlock(nnx.Module):
    """A user's block with attributes named like the switches, of its own meaning."""

    def __init__(self, rngs: nnx.Rngs):
        self.linear = nnx.Linear(4, 4, rngs=rngs)
        self.remat, self.attention_implementation = True, "ring"


class OwnModel(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        self.block = OwnBlock(rngs)


def test_a_users_own_submodule_attributes_named_like_switches_are_left_alone(tmp_path):
    """Only the module itself or an easytrain model inside it takes a switch: a user's block keeps its own `remat`
    and `attention_implementation` under the default arguments."""
    with nnx.use_eager_sharding(False):
        model = OwnModel(nnx.Rngs(0))
    apply_switches(model, tiny(tmp_path), "cpu")
    assert model.block.remat is True and model.block.attention_implementation == "ring"


class ValueHeadLlama(LlamaForCausalLM):
    """A user's subclass of easytrain's Llama (a value head on it): still an easytrain model for the switches."""


def test_a_wrapped_subclass_of_an_easytrain_model_takes_the_switch(tmp_path):
    with nnx.use_eager_sharding(False):
        scorer = RewardModel(ValueHeadLlama(tiny_config(num_hidden_layers=2), rngs=nnx.Rngs(0)), nnx.Rngs(1))
    apply_switches(scorer, tiny(tmp_path, remat_policy="full"), "cpu")
    assert scorer.llama.remat == "full"
