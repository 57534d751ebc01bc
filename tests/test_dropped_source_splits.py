"""A data source's splits other than 'train' and 'validation' (a 'test' split, say) are not used: that is said,
with how to evaluate on one, and which rows evaluate is left as it was (held out of 'train')."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import logging

import datasets
import pytest

from easytrain.data import load_text_datasets


def _train_and_test() -> datasets.DatasetDict:
    return datasets.DatasetDict(
        train=datasets.Dataset.from_list([{"prompt": f"q{i} what is", "completion": " four"} for i in range(40)]),
        test=datasets.Dataset.from_list([{"prompt": f"held out {i}", "completion": " dog"} for i in range(10)]))


@pytest.mark.parametrize("source", ["dataset", "dataset_name"])
def test_a_test_split_is_named_as_unused(tmp_path, caplog, source):
    splits = _train_and_test()
    if source == "dataset_name":
        splits.save_to_disk(str(tmp_path / "saved"))
        given = {"dataset_name": str(tmp_path / "saved")}
    else:
        given = {"dataset": splits}
    with caplog.at_level(logging.WARNING, logger="easytrain"):
        loaded = load_text_datasets(**given, validation_split_percentage=5)
    assert sorted(loaded) == ["train", "validation"] and len(loaded["validation"]) == 2  # held out, as before
    assert "held out" not in "".join(loaded["validation"]["prompt"])
    warning = caplog.text
    assert "'test'" in warning and "not used" in warning, warning
    assert "'validation'" in warning and "dataset_eval" in warning, warning  # how to evaluate on it


def test_train_and_validation_alone_say_nothing(caplog):
    splits = _train_and_test()
    splits["validation"] = splits.pop("test")
    with caplog.at_level(logging.WARNING, logger="easytrain"):
        loaded = load_text_datasets(dataset=splits)
    assert len(loaded["validation"]) == 10 and not caplog.text
