"""Evaluation metrics by name and `compute_metrics`: equal to NumPy, reduced on device, checked before compute;
`evaluate(dataset)` on another set."""

import datasets
import jax.numpy as jnp
import numpy as np
import pytest

from easytrain import ArgumentError, BaseTrainer, TrainingArguments
from easytrain.eval_metrics import Predictions, accuracy, perplexity
from easytrain.metrics import Mean
from easytrain.tasks.arithmetic import build_arithmetic_tokenizer
from easytrain.trainers.dpo import DPOTrainer

TEXT = "the quick brown fox jumps over the lazy dog and then sleeps in the warm afternoon sun "


def tiny(tmp_path, **overrides) -> TrainingArguments:
    values = dict(output_dir=str(tmp_path), max_length=32, train_batch_size=8, eval_batch_size=8, max_steps=2,
                  logging_steps=1, eval_strategy="no", save_strategy="no", report_to=["none"],
                  disable_progress_bar=True, save_pretrained_at_end=False, max_train_samples=64, max_eval_samples=16)
    values.update(overrides)
    return TrainingArguments(**values)


def numpy_reference(logits, labels, weights):
    shifted = logits - logits.max(-1, keepdims=True)
    log_probs = shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))
    nll = -np.take_along_axis(log_probs, labels[..., None], -1)[..., 0]
    accuracy = ((logits.argmax(-1) == labels) * weights).sum() / weights.sum()
    return accuracy, np.exp((nll * weights).sum() / weights.sum())


def test_built_in_metrics_equal_numpy_and_merge_exactly_across_batches():
    rng = np.random.default_rng(0)
    logits, labels = rng.normal(size=(6, 5, 11)).astype(np.float32), rng.integers(0, 11, (6, 5))
    weights = (rng.random((6, 5)) > 0.3).astype(np.float32)
    expected_accuracy, expected_perplexity = numpy_reference(logits, labels, weights)
    halves = [Predictions(jnp.asarray(logits[s]), jnp.asarray(labels[s]), jnp.asarray(weights[s]))
              for s in (slice(0, 2), slice(2, 6))]  # unequal halves: a mean of means would differ
    merged_accuracy = accuracy(halves[0]).merge(accuracy(halves[1])).result()
    merged_perplexity = perplexity(halves[0]).merge(perplexity(halves[1])).result()
    assert merged_accuracy == pytest.approx(expected_accuracy, rel=1e-6)
    assert merged_perplexity == pytest.approx(expected_perplexity, rel=1e-5)
    mean_of_means = np.mean([accuracy(h).result() for h in halves])
    assert abs(mean_of_means - expected_accuracy) > 1e-3, "the test data distinguishes exact merging"


def test_eval_metrics_choose_what_evaluate_reports(tmp_path):
    everything = BaseTrainer(tiny(tmp_path / "all")).evaluate()
    assert {"eval_loss", "eval_accuracy", "eval_perplexity", "eval_exact_match"} <= everything.keys()
    assert everything["eval_perplexity"] == pytest.approx(np.exp(everything["eval_loss"]), rel=1e-5)
    chosen = BaseTrainer(tiny(tmp_path / "some", eval_metrics=["accuracy"])).evaluate()
    assert "eval_accuracy" in chosen and "eval_perplexity" not in chosen and "eval_exact_match" not in chosen
    assert chosen["eval_accuracy"] == everything["eval_accuracy"]
    assert BaseTrainer(tiny(tmp_path / "none", eval_metrics=[])).evaluate().keys() == {"eval_loss", "eval_num_tokens"}


class TopTwo(BaseTrainer):
    """A metric of one's own, from the same predictions, reduced on device."""

    def compute_metrics(self, predictions, batch):
        top2 = jnp.argsort(predictions.logits, axis=-1)[..., -2:]
        hit = jnp.any(top2 == predictions.labels[..., None], axis=-1)
        weights = predictions.weights.astype(jnp.float32)
        return {**super().compute_metrics(predictions, batch), "top2_accuracy": Mean(jnp.sum(hit * weights),
                                                                                     jnp.sum(weights))}


def test_compute_metrics_adds_a_metric_that_metric_for_best_model_may_name(tmp_path):
    trainer = TopTwo(tiny(tmp_path, metric_for_best_model="eval_top2_accuracy", greater_is_better=True,
                          eval_metrics=["accuracy"], eval_strategy="steps"))
    metrics = trainer.evaluate()
    assert metrics["eval_top2_accuracy"] >= metrics["eval_accuracy"]


def test_metrics_a_run_cannot_produce_fail_before_compute(tmp_path):
    with pytest.raises(ArgumentError) as error:
        BaseTrainer(tiny(tmp_path / "typo", metric_for_best_model="eval_acuracy", eval_strategy="steps")).setup()
    assert error.value.field == "metric_for_best_model" and "eval_accuracy" in str(error.value)
    tokenizer = build_arithmetic_tokenizer()
    own_text = datasets.Dataset.from_dict({"text": [TEXT] * 40})  # no held-out prompts with answers
    with pytest.raises(ArgumentError) as error:
        BaseTrainer(tiny(tmp_path / "run", eval_metrics=["exact_match"]), dataset_train=own_text,
                    tokenizer=tokenizer).setup()
    assert error.value.field == "eval_metrics"
    with pytest.raises(ArgumentError) as error:
        tiny(tmp_path, eval_metrics=["bleu"])
    assert error.value.field == "eval_metrics" and "accuracy" in str(error.value)
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_a_loss_without_predictions_refuses_on_device_metrics_by_name(tmp_path):
    args = tiny(tmp_path, max_length=16, max_train_samples=32, max_eval_samples=8, eval_metrics=["accuracy"])
    with pytest.raises(ArgumentError) as error:
        DPOTrainer(args).setup()
    assert error.value.field == "eval_metrics" and "predictions" in str(error.value)


def test_evaluate_on_another_dataset_equals_a_run_configured_with_it(tmp_path):
    other = datasets.Dataset.from_dict({"text": [TEXT * 3] * 6})
    trainer = BaseTrainer(tiny(tmp_path / "a", eval_metrics=["accuracy", "perplexity"]))
    configured_set, other_set = trainer.evaluate(), trainer.evaluate(other)
    assert other_set.keys() == {"eval_loss", "eval_num_tokens", "eval_accuracy", "eval_perplexity"}
    assert abs(other_set["eval_loss"] - configured_set["eval_loss"]) > 1e-3
    train = datasets.Dataset.from_dict({"text": [TEXT] * 40})
    reference = BaseTrainer(tiny(tmp_path / "b", eval_metrics=["accuracy", "perplexity"], max_eval_samples=None),
                            tokenizer=trainer.tokenizer, dataset_train=train, dataset_eval=other).evaluate()
    for key in other_set:
        assert other_set[key] == pytest.approx(reference[key], rel=1e-5), key
