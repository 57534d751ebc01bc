"""Data given to a trainer whose `prepare_datasets` never reads it (constructor datasets, language-model data
arguments) is refused by name before the model is built; trainers that read it are not."""

import numpy as np
import pytest

from easytrain import ArgumentError, BaseTrainer, TrainingArguments
from easytrain.trainers.given_data import given_datasets
from test_custom_module_errors import Classifier, blobs


def _args(tmp_path, **overrides) -> TrainingArguments:
    return TrainingArguments(**(dict(output_dir=str(tmp_path), max_steps=1, train_batch_size=8, eval_batch_size=8,
                                     eval_strategy="no", save_strategy="no", report_to=["none"],
                                     disable_progress_bar=True, save_pretrained_at_end=False) | overrides))


@pytest.mark.parametrize("given, field", [
    (dict(dataset_train=blobs(64, 5)), "dataset_train"),
    (dict(dataset_eval=blobs(8, 6)), "dataset_eval"),
    (dict(train_file="/nonexistent.json"), "train_file"),
    (dict(max_train_samples=3), "max_train_samples"),
    (dict(validation_split_percentage=0), "validation_split_percentage"),
])
def test_data_a_trainer_with_its_own_rows_ignores_is_refused(tmp_path, given, field):
    datasets_given = {key: value for key, value in given.items() if key.startswith("dataset_")}
    arguments = _args(tmp_path, **{key: value for key, value in given.items() if key not in datasets_given})
    trainer = Classifier(arguments, **datasets_given)
    with pytest.raises(ArgumentError, match=rf"^{field}: .*Classifier's prepare_datasets builds its own rows"):
        trainer.setup()
    assert trainer._model is None  # refused before the model is built


def test_every_ignored_item_is_named(tmp_path):
    trainer = Classifier(_args(tmp_path, train_file="/nonexistent.json", max_train_samples=3),
                         dataset_eval=blobs(8, 6))
    with pytest.raises(ArgumentError, match=r"dataset_eval, train_file and max_train_samples"):
        trainer.setup()


class ReadsGiven(Classifier):
    def prepare_datasets(self):
        train, evaluation = given_datasets(self)
        return train, evaluation


class DeclaresReading(Classifier):
    reads_given_data = True

    def prepare_datasets(self):
        rows = blobs(32, 1)
        return {key: value[: self.arguments.max_train_samples] for key, value in rows.items()}, None


def test_trainers_that_read_the_given_data_are_not_refused(tmp_path):
    trainer = ReadsGiven(_args(tmp_path), dataset_train=blobs(24, 5), dataset_eval=blobs(8, 6))
    assert len(trainer.dataset_train["label"]) == 24 and len(trainer.dataset_eval["label"]) == 8
    declared = DeclaresReading(_args(tmp_path / "declared", max_train_samples=16))
    assert len(declared.dataset_train["label"]) == 16


def test_defaults_and_the_language_model_rows_are_not_refused(tmp_path):
    assert len(Classifier(_args(tmp_path)).dataset_train["label"]) == 32

    class Wrapped(BaseTrainer):  # reads them through the default
        def prepare_datasets(self):
            return super().prepare_datasets()[0], None

    wrapped = Wrapped(_args(tmp_path / "wrapped", max_length=16, max_train_samples=40, validation_split_percentage=0))
    assert wrapped.configure_dataloaders().total_steps == 1


def test_several_eval_sets_from_prepare_datasets_are_refused_with_the_fix(tmp_path):
    class Several(Classifier):
        def prepare_datasets(self):
            return blobs(32, 1), {"a": blobs(16, 2), "b": blobs(8, 3)}

    with pytest.raises(TypeError, match=r"prepare_datasets returned a dict of several eval sets \('a', 'b'\).*"
                                        r"trainer.evaluate\(dataset\)"):
        Several(_args(tmp_path)).setup()


def test_a_mapping_of_columns_is_still_one_eval_set(tmp_path):
    trainer = Classifier(_args(tmp_path))
    assert isinstance(trainer.dataset_eval["x"], np.ndarray) and trainer.evaluate()["eval_loss"] > 0
