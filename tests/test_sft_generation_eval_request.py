"""SFT's `generation_eval_samples > 0` is an explicit request for the greedy-generation evaluator: on a module that
cannot generate (no init_cache()/decode()) it fails at set-up naming `generation_eval_samples`, where the embedded
task's own evaluation (left at 0) is left out with a warning. It was left out with a warning too: the run trained
without the evaluation it was asked for."""

import logging

import pytest
from flax import nnx

from easytrain import ArgumentError, TrainingArguments
from easytrain.evaluators import CompletionMetrics
from easytrain.trainers.sft import SFTArguments, SFTTrainer


class Scorer(nnx.Module):
    """The trainer's language model, called through a wrapper that has no init_cache()/decode() to generate with."""

    def __init__(self, llama: nnx.Module):
        self.llama = llama

    @property
    def config(self):
        return self.llama.config

    def __call__(self, *args, **kwargs):
        return self.llama(*args, **kwargs)


class ScorerSFTTrainer(SFTTrainer):
    def create_module(self) -> nnx.Module:
        return Scorer(super().create_module())


def arguments(tmp_path, **overrides) -> TrainingArguments:
    values = dict(output_dir=str(tmp_path), max_length=32, train_batch_size=4, eval_batch_size=4, max_steps=1,
                  eval_strategy="no", save_strategy="no", report_to=["none"], disable_progress_bar=True,
                  save_pretrained_at_end=False, max_train_samples=16, max_eval_samples=8)
    return TrainingArguments(**{**values, **overrides})


def test_generation_eval_samples_on_a_module_that_cannot_generate_fails_at_set_up(tmp_path):
    trainer = ScorerSFTTrainer(arguments(tmp_path), SFTArguments(generation_eval_samples=4))
    with pytest.raises(ArgumentError) as caught:
        trainer.setup()
    assert caught.value.field == "generation_eval_samples"
    assert "Scorer" in caught.value.message and "--generation_eval_samples 0" in caught.value.message


def test_the_embedded_tasks_own_generation_evaluation_is_left_out_with_a_warning(tmp_path, caplog):
    trainer = ScorerSFTTrainer(arguments(tmp_path), SFTArguments())
    with caplog.at_level(logging.WARNING, logger="easytrain"):
        trainer.setup()
    assert not any(isinstance(evaluator, CompletionMetrics) for evaluator in trainer.evaluators)
    assert any("exact_match" in r.getMessage() and "Scorer" in r.getMessage() for r in caplog.records)


def test_generation_eval_samples_is_not_refused_when_eval_metrics_leaves_exact_match_out(tmp_path):
    trainer = ScorerSFTTrainer(arguments(tmp_path, eval_metrics=["accuracy"]), SFTArguments(generation_eval_samples=4))
    trainer.setup()
    assert not any(isinstance(evaluator, CompletionMetrics) for evaluator in trainer.evaluators)
