"""What a custom trainer is told, during set-up and before any step, when its rows or its loss's predictions
cannot work: a column whose rows differ in shape is named with the fix (pad in collate and pass a mask) whether it
comes as lists, a numpy object array or a `datasets.Dataset`; predictions the default `compute_metrics` cannot
score are named with the two ways out."""

import datasets
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from easytrain import BaseTrainer, LossOutput, TrainingArguments
from easytrain.data import DataError
from easytrain.eval_metrics import Predictions, TokenScores, on_device_metrics
from easytrain.metrics import mean_over

WIDTH, CLASSES = 6, 3


def lengths(count: int) -> np.ndarray:
    return 3 + np.arange(count) % 4  # 3 to 6 values a row


def ragged(count: int) -> list[np.ndarray]:
    return [np.full(n, 0.5, np.float32) for n in lengths(count)]


def labels(count: int) -> np.ndarray:
    return (np.arange(count) % CLASSES).astype(np.int32)


def objects(rows: list[np.ndarray]) -> np.ndarray:
    """`rows` as a numpy object array, one entry a row."""
    holder = np.empty(len(rows), object)
    holder[:] = rows
    return holder


class SequenceClassifier(BaseTrainer):
    """Rows of variable length, padded in collate to `WIDTH` with a mask: the documented way."""

    def prepare_datasets(self):
        return {"seq": objects(ragged(32)), "label": labels(32)}, None

    def collate(self, rows, example_ids):
        padded = np.zeros((len(example_ids), WIDTH), np.float32)
        mask = np.zeros((len(example_ids), WIDTH), np.float32)
        for i, row in enumerate(rows["seq"]):
            padded[i, :len(row)], mask[i, :len(row)] = row, 1
        return {"seq": padded, "mask": mask, "label": np.asarray(rows["label"]),
                "weight": (example_ids >= 0).astype(np.float32), "example_id": example_ids}

    def create_module(self):
        return nnx.Linear(WIDTH, CLASSES, rngs=nnx.Rngs(0))

    def configure_optimizer(self, schedule):
        return optax.sgd(schedule)

    def compute_loss(self, model, batch, rng, train, frozen):
        logits = model(batch["seq"] * batch["mask"])
        nll = -jnp.take_along_axis(jax.nn.log_softmax(logits), batch["label"][:, None], axis=-1)[:, 0]
        return LossOutput(jnp.sum(nll * batch["weight"]), jnp.sum(batch["weight"]),
                          {"hit": mean_over(jnp.argmax(logits, -1) == batch["label"], batch["weight"])},
                          predictions=Predictions(logits, batch["label"], batch["weight"]))


class Unpadded(SequenceClassifier):
    """A collate that passes the ragged rows on as they came."""

    def collate(self, rows, example_ids):
        return {**super().collate(rows, example_ids), "seq": np.asarray(rows["seq"])}


def arguments(tmp_path, **overrides) -> TrainingArguments:
    values = dict(output_dir=str(tmp_path / "run"), train_batch_size=8, eval_batch_size=8, max_steps=2,
                  logging_steps=1, eval_strategy="no", save_strategy="no", report_to=["none"],
                  disable_progress_bar=True, save_pretrained_at_end=False, learning_rate=0.05, warmup_steps=0)
    return TrainingArguments(**{**values, **overrides})


def with_rows(base: type, train, evaluation=None) -> type:
    return type("Trainer", (base,), {"prepare_datasets": lambda self: (train, evaluation)})


RAGGED_SOURCE = r"column 'seq'.*rows of different shapes.*\(3,\).*\(4,\).*[Pp]ad .*collate.*mask"


@pytest.mark.parametrize("seq", [[list(row) for row in ragged(32)], ragged(32)], ids=["lists", "arrays"])
def test_a_ragged_column_of_a_dict_is_named_with_the_fix(tmp_path, seq):
    trainer = with_rows(SequenceClassifier, {"seq": seq, "label": labels(32)})(arguments(tmp_path))
    with pytest.raises(DataError, match=RAGGED_SOURCE):
        trainer.setup()


def test_a_ragged_column_of_images_is_named_with_the_fix(tmp_path):
    images = [np.zeros((4, 4 - i % 2, 1), np.float32) for i in range(32)]
    trainer = with_rows(SequenceClassifier, {"seq": images, "label": labels(32)})(arguments(tmp_path))
    with pytest.raises(DataError, match=r"column 'seq'.*different shapes \(\(4, 4, 1\), \(4, 3, 1\)\).*mask"):
        trainer.setup()


RAGGED_BATCH = r"batch field 'seq'.*rows of different shapes.*\(\d,\).*\(\d,\).*pad .*collate.*mask"


def ragged_dataset() -> datasets.Dataset:
    return datasets.Dataset.from_dict({"seq": [list(row) for row in ragged(32)], "label": labels(32)})


@pytest.mark.parametrize("source", ["object array", "dataset"])
def test_ragged_rows_a_collate_leaves_unpadded_are_named_with_the_fix(tmp_path, source):
    rows = ragged_dataset() if source == "dataset" else {"seq": objects(ragged(32)),
                                                         "label": labels(32)}
    trainer = with_rows(Unpadded, rows)(arguments(tmp_path))
    with pytest.raises(DataError, match=RAGGED_BATCH):
        trainer.train()
    assert trainer.state.step == 0  # refused before the first step


def test_ragged_eval_rows_are_named_during_set_up(tmp_path):
    trainer = with_rows(Unpadded, {"seq": np.ones((32, WIDTH), np.float32), "label": labels(32)},
                        ragged_dataset())(arguments(tmp_path))
    with pytest.raises(DataError, match=RAGGED_BATCH):
        trainer.setup()


def test_equal_rows_left_as_objects_are_told_to_stack(tmp_path):
    rows = {"seq": objects([np.ones(WIDTH, np.float32)] * 32), "label": labels(32)}
    with pytest.raises(DataError, match=r"batch field 'seq'.*object array.*np\.stack"):
        with_rows(Unpadded, rows)(arguments(tmp_path)).train()


def test_ragged_rows_padded_in_collate_train(tmp_path):
    for rows in ({"seq": objects(ragged(32)), "label": labels(32)}, ragged_dataset()):
        trainer = with_rows(SequenceClassifier, rows, rows)(arguments(tmp_path / str(type(rows).__name__)))
        assert np.isfinite(trainer.train()["loss"])
        assert set(trainer.evaluate()) >= {"eval_loss", "eval_accuracy", "eval_perplexity"}


class RawLogits(SequenceClassifier):
    def compute_loss(self, model, batch, rng, train, frozen):
        out = super().compute_loss(model, batch, rng, train, frozen)
        return out._replace(predictions=out.predictions.logits)


RAW = r"LossOutput\.predictions as a jax\.Array of shape \(8, 3\).*Predictions\(logits, labels, weights\).*compute_metr"


@pytest.mark.parametrize("eval_metrics", [None, ["accuracy"]])
def test_plain_logits_as_predictions_are_refused_during_set_up(tmp_path, eval_metrics):
    rows = {"seq": objects(ragged(32)), "label": labels(32)}
    trainer = with_rows(RawLogits, rows, rows)(arguments(tmp_path, eval_metrics=eval_metrics))
    with pytest.raises(TypeError, match=RAW):
        trainer.setup()


def test_predictions_of_either_kind_are_scored():
    logits, targets, weights = jnp.zeros((8, CLASSES)), jnp.zeros(8, jnp.int32), jnp.ones(8)
    scored = on_device_metrics(("accuracy",), Predictions(logits, targets, weights), requested=True)
    assert set(scored) == {"accuracy"}
    assert set(on_device_metrics(("perplexity",), TokenScores(weights, weights, weights), requested=True)) == \
        {"perplexity"}
    assert on_device_metrics((), logits, requested=False) == {}  # nothing asked, nothing scored
    with pytest.raises(TypeError, match=RAW):
        on_device_metrics(("accuracy",), logits, requested=False)
