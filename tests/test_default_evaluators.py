"""A module that cannot generate (a reward model: no init_cache()/decode()) on the default rows: the greedy-generation
evaluator those rows add by default is left out at set-up, and one asked for is refused at set-up, naming the metric;
never a crash at the first evaluation, after the steps before it were trained and lost."""

import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from easytrain import ArgumentError, BaseTrainer, LossOutput, TrainingArguments
from easytrain.evaluators import ExactMatch
from easytrain.generation import GenerationError
from reward_model import RewardModel


class RewardTrainer(BaseTrainer):
    """Keeps the default prepare_datasets, as the docs' PreferenceTrainer does; pairs a block with its reverse."""

    token_fields = ()

    def create_module(self) -> nnx.Module:
        return RewardModel(super().create_module(), nnx.Rngs(self.arguments.seed + 1))

    def collate(self, rows, example_ids):
        ids = np.asarray(rows["input_ids"], np.int32)[:, :-1]
        return {"pairs": np.stack([ids, ids[:, ::-1]], 1), "weight": (example_ids >= 0).astype(np.float32),
                "example_id": example_ids}

    def count_tokens(self, batch) -> int:
        return int(batch["pairs"].size)

    def compute_loss(self, model, batch, rng, train, frozen):
        B, _, T = batch["pairs"].shape
        margin = model(batch["pairs"].reshape(2 * B, T)).reshape(B, 2) @ jnp.array([1.0, -1.0])
        return LossOutput(jnp.sum(-jax.nn.log_sigmoid(margin) * batch["weight"]), jnp.sum(batch["weight"]), {})

    def compute_metrics(self, predictions, batch):
        return {}


def tiny(tmp_path, **overrides) -> TrainingArguments:
    values = dict(output_dir=str(tmp_path), max_length=16, train_batch_size=4, eval_batch_size=4, max_steps=2,
                  logging_steps=1, eval_strategy="steps", eval_steps=1, save_strategy="steps", save_steps=2,
                  report_to=["none"], disable_progress_bar=True, save_pretrained_at_end=False,
                  max_train_samples=32, max_eval_samples=8)
    return TrainingArguments(**{**values, **overrides})


def check_default_exact_match_left_out(trainer, tmp_path, caplog) -> None:
    """Set-up warns that the default exact_match is left out for the reward model, and training evaluates without
    attempting a generation, to a checkpoint."""
    with caplog.at_level(logging.WARNING, logger="easytrain"):
        trainer.setup()
    assert not any(isinstance(evaluator, ExactMatch) for evaluator in trainer.evaluators)
    assert any("exact_match" in r.getMessage() and "RewardModel" in r.getMessage() for r in caplog.records)
    trainer.train()  # evaluates after steps 1 and 2: no generation is attempted
    assert (tmp_path / "checkpoints").is_dir() and any((tmp_path / "checkpoints").iterdir())


def test_the_default_exact_match_is_left_out_for_a_module_that_cannot_generate(tmp_path, caplog):
    check_default_exact_match_left_out(RewardTrainer(tiny(tmp_path)), tmp_path, caplog)


def test_exact_match_asked_for_on_a_module_that_cannot_generate_fails_at_set_up(tmp_path):
    trainer = RewardTrainer(tiny(tmp_path, eval_metrics=["exact_match"]))
    with pytest.raises(ArgumentError, match="exact_match") as caught:
        trainer.setup()
    assert caught.value.field == "eval_metrics" and "RewardModel" in caught.value.message
    assert "without exact_match" in caught.value.message


def test_a_generation_evaluator_passed_for_a_module_that_cannot_generate_fails_at_set_up(tmp_path):
    from easytrain.tasks.arithmetic import build_arithmetic_tokenizer

    tokenizer = build_arithmetic_tokenizer()
    given = ExactMatch(["1+1="], ["2"], tokenizer, name="sums")
    trainer = RewardTrainer(tiny(tmp_path), evaluators=[given])
    with pytest.raises(GenerationError, match="sums.*RewardModel.*evaluators="):
        trainer.setup()


def test_a_given_module_that_cannot_generate_is_decided_before_it_is_placed(tmp_path):
    probe = RewardTrainer(tiny(tmp_path / "probe"))
    probe.prepare_datasets()  # the default rows' model_config
    module = probe.initial_module()  # a concrete RewardModel, laid out as the trainer lays out its own
    asked = RewardTrainer(tiny(tmp_path / "asked", eval_metrics=["exact_match"]), model=module)
    with pytest.raises(ArgumentError, match="exact_match"):
        asked.setup()
    unasked = RewardTrainer(tiny(tmp_path / "unasked", max_steps=1, save_strategy="no"), model=module)
    unasked.setup()
    assert not any(isinstance(evaluator, ExactMatch) for evaluator in unasked.evaluators)
