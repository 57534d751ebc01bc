"""load_text_datasets: every kind of source ends as train (+ validation) splits."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import json

import datasets
import pandas as pd
import pytest

from easytrain.data import DataError, load_text_datasets

TEXTS = [f"document number {i}" for i in range(40)]


def _write(path, texts):
    """Write `texts` in the format implied by the file extension."""
    suffix = path.suffix
    if suffix in (".txt", ".text"):
        path.write_text("\n".join(texts) + "\n")
    elif suffix == ".jsonl":
        path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    elif suffix == ".json":
        path.write_text(json.dumps([{"text": t} for t in texts]))
    elif suffix == ".csv":
        pd.DataFrame({"text": texts}).to_csv(path, index=False)
    elif suffix == ".parquet":
        pd.DataFrame({"text": texts}).to_parquet(path)
    return path


@pytest.mark.parametrize("suffix", [".json", ".jsonl", ".csv", ".parquet", ".txt", ".text"])
def test_local_files_by_extension(tmp_path, suffix):
    train = _write(tmp_path / f"train{suffix}", TEXTS[:30])
    valid = _write(tmp_path / f"valid{suffix}", TEXTS[30:])
    splits = load_text_datasets(
        train_file=train, validation_file=valid, cache_dir=tmp_path / "cache"
    )
    assert set(splits) == {"train", "validation"}
    assert list(splits["train"]["text"]) == TEXTS[:30]
    assert list(splits["validation"]["text"]) == TEXTS[30:]


def test_in_memory_dataset_gets_a_seeded_validation_split():
    source = datasets.Dataset.from_dict({"text": TEXTS})
    splits = load_text_datasets(dataset=source, validation_split_percentage=10, seed=3)
    again = load_text_datasets(dataset=source, validation_split_percentage=10, seed=3)
    other = load_text_datasets(dataset=source, validation_split_percentage=10, seed=4)
    train, valid = list(splits["train"]["text"]), list(splits["validation"]["text"])
    assert len(valid) == 4 and len(train) == 36
    assert sorted(train + valid) == sorted(TEXTS)
    assert valid == list(again["validation"]["text"])
    assert valid != list(other["validation"]["text"])


def test_small_percentage_still_holds_out_one_row():
    source = datasets.Dataset.from_dict({"text": TEXTS[:3]})
    splits = load_text_datasets(dataset=source, validation_split_percentage=1)
    assert (len(splits["train"]), len(splits["validation"])) == (2, 1)


def test_zero_percentage_keeps_everything_for_training():
    source = datasets.Dataset.from_dict({"text": TEXTS})
    splits = load_text_datasets(dataset=source, validation_split_percentage=0)
    assert list(splits) == ["train"] and len(splits["train"]) == len(TEXTS)


def test_dataset_dict_keeps_its_validation_and_drops_other_splits():
    source = datasets.DatasetDict(
        train=datasets.Dataset.from_dict({"text": TEXTS[:30]}),
        validation=datasets.Dataset.from_dict({"text": TEXTS[30:35]}),
        test=datasets.Dataset.from_dict({"text": TEXTS[35:]}),
    )
    splits = load_text_datasets(dataset=source)
    assert list(splits) == ["train", "validation"]
    assert list(splits["validation"]["text"]) == TEXTS[30:35]


def test_dataset_name_can_be_a_local_directory(tmp_path):
    (tmp_path / "data").mkdir()
    _write(tmp_path / "data" / "train.jsonl", TEXTS)
    splits = load_text_datasets(
        dataset_name=str(tmp_path / "data"),
        validation_split_percentage=25,
        cache_dir=tmp_path / "cache",
    )
    assert (len(splits["train"]), len(splits["validation"])) == (30, 10)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({}, r"No data source given.*`dataset`.*`dataset_name`.*`train_file`"),
        ({"dataset_name": "x", "train_file": "a.txt"}, r"dataset_name, train_file.*exactly one"),
        ({"validation_file": "v.txt"}, "`validation_file` was given without `train_file`"),
        ({"dataset_name": "x", "validation_split_percentage": -1}, "`validation_split_percentage`"),
        ({"dataset_name": "x", "validation_split_percentage": 100}, r"must be in \[0, 100\)"),
        ({"dataset": [1, 2]}, r"`dataset` must be a datasets\.Dataset"),
    ],
)
def test_argument_errors(kwargs, match):
    with pytest.raises(DataError, match=match):
        load_text_datasets(**kwargs)


def test_both_dataset_and_files_is_an_error(tmp_path):
    source = datasets.Dataset.from_dict({"text": TEXTS})
    with pytest.raises(DataError, match=r"dataset, train_file.*exactly one"):
        load_text_datasets(dataset=source, train_file=_write(tmp_path / "t.txt", TEXTS))


def test_missing_file_names_the_argument(tmp_path):
    train = _write(tmp_path / "t.txt", TEXTS)
    with pytest.raises(DataError, match=r"`validation_file` '.*nope\.txt' does not exist"):
        load_text_datasets(train_file=train, validation_file=tmp_path / "nope.txt")


def test_unknown_extension_lists_the_supported_ones(tmp_path):
    path = tmp_path / "train.xml"
    path.write_text("<a/>")
    with pytest.raises(DataError, match=r"`train_file`.*'\.xml'.*\.jsonl, \.csv, \.parquet"):
        load_text_datasets(train_file=path)


def test_mixed_file_formats_are_rejected(tmp_path):
    train, valid = _write(tmp_path / "t.txt", TEXTS), _write(tmp_path / "v.csv", TEXTS)
    with pytest.raises(DataError, match="different formats"):
        load_text_datasets(train_file=train, validation_file=valid)


def test_empty_split_is_named():
    source = datasets.DatasetDict(
        train=datasets.Dataset.from_dict({"text": TEXTS}),
        validation=datasets.Dataset.from_dict({"text": []}),
    )
    with pytest.raises(DataError, match="'validation' split has no rows"):
        load_text_datasets(dataset=source)
    with pytest.raises(DataError, match="'train' split has no rows"):
        load_text_datasets(dataset=datasets.Dataset.from_dict({"text": []}))


def test_missing_train_split_is_named():
    source = datasets.DatasetDict(test=datasets.Dataset.from_dict({"text": TEXTS}))
    with pytest.raises(DataError, match=r"no 'train' split.*it has test"):
        load_text_datasets(dataset=source)


def test_too_few_rows_to_hold_out_validation():
    with pytest.raises(DataError, match=r"has 1 rows.*`validation_split_percentage=0`"):
        load_text_datasets(dataset=datasets.Dataset.from_dict({"text": ["only"]}))


def test_errors_are_value_errors():
    assert issubclass(DataError, ValueError)


def test_dataset_save_to_disk_directories_load_as_dataset_name(tmp_path):
    datasets.Dataset.from_dict({"text": TEXTS}).save_to_disk(tmp_path / "one")
    splits = load_text_datasets(dataset_name=str(tmp_path / "one"), validation_split_percentage=10)
    assert (len(splits["train"]), len(splits["validation"])) == (36, 4)
    datasets.DatasetDict(train=datasets.Dataset.from_dict({"text": TEXTS[:30]}),
                         validation=datasets.Dataset.from_dict({"text": TEXTS[30:]})).save_to_disk(tmp_path / "dict")
    splits = load_text_datasets(dataset_name=str(tmp_path / "dict"))
    assert list(splits["validation"]["text"]) == TEXTS[30:]


def test_csv_text_cells_are_read_literally(tmp_path):
    path = tmp_path / "na.csv"
    path.write_text("text\nNone\nNA\nnull\nNaN\nn/a\nhello world\n")
    splits = load_text_datasets(train_file=path, validation_split_percentage=0, cache_dir=tmp_path / "cache")
    assert list(splits["train"]["text"]) == ["None", "NA", "null", "NaN", "n/a", "hello world"]


def test_a_byte_order_mark_is_not_text(tmp_path):
    path = tmp_path / "bom.txt"
    path.write_bytes("\ufeffline one\nline two\n".encode("utf-8"))
    splits = load_text_datasets(train_file=path, validation_split_percentage=0, cache_dir=tmp_path / "cache")
    assert list(splits["train"]["text"]) == ["line one", "line two"]


def test_a_directory_as_train_file_points_at_dataset_name(tmp_path):
    with pytest.raises(DataError, match=r"`train_file` '.*' is a directory.*`dataset_name`"):
        load_text_datasets(train_file=tmp_path)
