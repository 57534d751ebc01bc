"""lm_blocks.lm_blocks / lm_eval_blocks: what cannot make blocks is refused before compute, naming the split."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import datasets
import pytest

from easytrain import ArgumentError, TrainingArguments
from easytrain.data import DataError
from easytrain.tasks import build_arithmetic_tokenizer
from easytrain.trainers import lm_blocks


def _args(tmp_path, **kwargs) -> TrainingArguments:
    return TrainingArguments(output_dir=str(tmp_path / "run"), **{"max_length": 8, **kwargs})


def _rows(lengths: list[int]) -> datasets.Dataset:
    return datasets.Dataset.from_dict({"input_ids": [[3] * length for length in lengths]})


def test_a_pretokenized_row_of_another_length_is_named_before_compute(tmp_path):
    lengths = [9] * 16
    lengths[13] = 7
    splits = datasets.DatasetDict(train=_rows(lengths), validation=_rows([9] * 4))
    with pytest.raises(DataError, match=r"'train' split: row 13 holds 7 tokens.*max_length \+ 1 = 9"):
        lm_blocks.lm_blocks(_args(tmp_path), None, splits)
    splits = datasets.DatasetDict(train=_rows([9] * 8), validation=_rows([9, 9, 10]))
    with pytest.raises(DataError, match=r"'validation' split: row 2 holds 10 tokens"):
        lm_blocks.lm_blocks(_args(tmp_path), None, splits)


def test_evaluate_dataset_rows_are_checked_the_same_way(tmp_path):
    with pytest.raises(DataError, match=r"evaluate\(dataset\).*row 1 holds 0 tokens"):
        lm_blocks.lm_eval_blocks(_args(tmp_path), None, _rows([9, 0, 9]))


def test_rows_of_a_selection_are_checked_and_named_as_stored(tmp_path):
    """The short row is the selection's third and the stored data's second: named as stored (data/row_errors.py)."""
    data = _rows([9, 5, 9, 9, 9, 9])
    kept = data.filter(lambda row: len(row["input_ids"]) == 9)
    assert len(lm_blocks.lm_eval_blocks(_args(tmp_path), None, kept)) == 5
    with pytest.raises(DataError, match=r"row 1 holds 5 tokens"):
        lm_blocks.lm_eval_blocks(_args(tmp_path), None, data.select([0, 2, 1]))
    assert len(lm_blocks.lm_eval_blocks(_args(tmp_path), None, data, limit=1)) == 1  # only the rows used


def test_rows_all_of_another_length_suggest_that_max_length(tmp_path):
    with pytest.raises(ArgumentError, match=r"max_length: pre-tokenized rows of the 'train' split hold 11 tokens.*"
                                            r"--max_length 10"):
        lm_blocks.lm_blocks(_args(tmp_path), None, datasets.DatasetDict(train=_rows([11] * 4)))


def test_a_validation_split_too_small_for_one_block_names_the_split_and_its_fixes(tmp_path):
    splits = datasets.DatasetDict(train=datasets.Dataset.from_dict({"text": ["12+34=46"] * 50}),
                                  validation=datasets.Dataset.from_dict({"text": ["1+1=2"]}))
    with pytest.raises(DataError, match=r"The 'validation' split has 6 tokens.*one block needs 17 \(max_length \+ 1\).*"
                                        r"validation_split_percentage.*validation_file.*max_length") as info:
        lm_blocks.lm_blocks(_args(tmp_path, max_length=16), build_arithmetic_tokenizer(), splits)
    assert (info.value.num_tokens, info.value.block_size) == (6, 17)


def test_a_train_split_too_small_for_one_block_names_the_split(tmp_path):
    splits = datasets.DatasetDict(train=datasets.Dataset.from_dict({"text": ["1+1=2"]}))
    with pytest.raises(DataError, match=r"The 'train' split has 6 tokens.*add training data or lower `max_length`"):
        lm_blocks.lm_blocks(_args(tmp_path, max_length=16), build_arithmetic_tokenizer(), splits)
