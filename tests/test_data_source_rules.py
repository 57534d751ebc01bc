"""Which data a run trains and evaluates on, for every combination of trainer arguments and data flags.

Rule: one training source at most (dataset_train, train_file or dataset_name); a given eval set
(dataset_eval, or validation_file beside train_file) is what evaluation uses; an eval set without a
training source is an error; no data at all trains on the embedded arithmetic corpus.
"""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import datasets
import pytest

from easytrain import ArgumentError, TrainingArguments
from easytrain.data import DataError
from easytrain.trainers import builders

TRAIN = [f"train line {i}" for i in range(40)]
VALID = [f"file validation {i}" for i in range(4)]
MEMORY_TRAIN = datasets.Dataset.from_dict({"text": [f"memory train {i}" for i in range(40)]})
MEMORY_EVAL = datasets.Dataset.from_dict({"text": ["memory eval a", "memory eval b"]})


@pytest.fixture
def files(tmp_path):
    (tmp_path / "train.txt").write_text("\n".join(TRAIN) + "\n")
    (tmp_path / "valid.txt").write_text("\n".join(VALID) + "\n")
    (tmp_path / "named").mkdir()
    (tmp_path / "named" / "train.txt").write_text("\n".join(f"named {i}" for i in range(40)) + "\n")
    return tmp_path


def _args(files, **kwargs) -> TrainingArguments:
    paths = {"train_file": str(files / "train.txt"), "validation_file": str(files / "valid.txt"),
             "dataset_name": str(files / "named")}
    return TrainingArguments(output_dir=str(files / "run"), **{key: paths[key] for key in kwargs if kwargs[key]})


def _texts(splits, name):
    return sorted(splits[name]["text"]) if name in splits else None


def test_no_data_at_all_is_the_embedded_corpus(files):
    args = _args(files)
    assert builders.uses_embedded_data(args, None, None)
    assert "=" in builders.raw_datasets(args, None, None)["train"][0]["text"]


@pytest.mark.parametrize("train", ["dataset_train", "train_file", "dataset_name"])
def test_a_given_eval_set_is_used_whatever_gives_the_train_set(files, train):
    args = _args(files, train_file=train == "train_file", dataset_name=train == "dataset_name")
    splits = builders.raw_datasets(args, MEMORY_TRAIN if train == "dataset_train" else None, MEMORY_EVAL)
    assert _texts(splits, "validation") == ["memory eval a", "memory eval b"]
    assert len(splits["train"]) == 40  # nothing held out beside the given eval set


def test_an_eval_set_replaces_the_train_sources_own_validation_split(files):
    source = datasets.DatasetDict(train=MEMORY_TRAIN, validation=datasets.Dataset.from_dict({"text": ["own"]}))
    splits = builders.raw_datasets(_args(files), source, MEMORY_EVAL)
    assert _texts(splits, "validation") == ["memory eval a", "memory eval b"] and len(splits["train"]) == 40


def test_validation_file_beside_train_file_is_used(files):
    splits = builders.raw_datasets(_args(files, train_file=True, validation_file=True), None, None)
    assert _texts(splits, "validation") == sorted(VALID) and _texts(splits, "train") == sorted(TRAIN)


@pytest.mark.parametrize("train", ["dataset_train", "train_file", "dataset_name"])
def test_without_an_eval_set_one_is_held_out_of_the_train_set(files, train):
    args = _args(files, train_file=train == "train_file", dataset_name=train == "dataset_name")
    splits = builders.raw_datasets(args, MEMORY_TRAIN if train == "dataset_train" else None, None)
    assert (len(splits["train"]), len(splits["validation"])) == (38, 2)


@pytest.mark.parametrize(("given", "match"), [
    ({"dataset_train": True, "train_file": True}, r"dataset_train and train_file"),
    ({"dataset_train": True, "dataset_name": True}, r"dataset_train and dataset_name"),
    ({"train_file": True, "dataset_name": True}, r"train_file and dataset_name"),
    ({"dataset_train": True, "train_file": True, "validation_file": True}, r"dataset_train and train_file"),
    ({"dataset_eval": True}, r"`dataset_eval` was given without training data.*dataset_train, train_file"),
    ({"train_file": True, "validation_file": True, "dataset_eval": True}, r"dataset_eval and validation_file"),
])
def test_ambiguous_or_incomplete_sources_are_refused(files, given, match):
    args = _args(files, **{key: value for key, value in given.items() if not key.startswith("dataset_")
                           or key == "dataset_name"})
    train = MEMORY_TRAIN if given.get("dataset_train") else None
    evaluation = MEMORY_EVAL if given.get("dataset_eval") else None
    with pytest.raises(DataError, match=match):
        builders.raw_datasets(args, train, evaluation)
    with pytest.raises(DataError, match=match):
        builders.uses_embedded_data(args, train, evaluation)


@pytest.mark.parametrize("train", [{}, {"dataset_name": True}])
def test_validation_file_without_train_file_is_refused_with_the_arguments(files, train):
    with pytest.raises(ArgumentError, match="validation_file: is used only together with train_file"):
        _args(files, validation_file=True, **train)


def test_an_eval_set_must_be_a_dataset(files):
    with pytest.raises(DataError, match=r"`dataset_eval` must be a datasets\.Dataset"):
        builders.raw_datasets(_args(files, train_file=True), None, ["not", "a", "dataset"])
    with pytest.raises(DataError, match=r"`dataset_eval` has no rows"):
        builders.raw_datasets(_args(files, train_file=True), None, MEMORY_EVAL.select([]))


@pytest.mark.parametrize("trainer", ["sft", "dpo"])
def test_sft_and_dpo_refuse_an_eval_set_without_training_data(files, trainer):
    """They decide on the embedded data before reading the splits: an eval set alone trained on arithmetic."""
    from easytrain.trainers.dpo import DPOTrainer
    from easytrain.trainers.sft import SFTTrainer

    rows = datasets.Dataset.from_dict({"prompt": ["a"], "completion": ["b"], "chosen": ["b"], "rejected": ["c"]})
    cls = {"sft": SFTTrainer, "dpo": DPOTrainer}[trainer]
    with pytest.raises(DataError, match="`dataset_eval` was given without training data"):
        cls(_args(files), dataset_eval=rows).train()
