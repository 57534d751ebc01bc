"""Every error that names a bad row names it as stored, also once rows are held out for validation.

`validation_split_percentage` (default 5) holds a shuffled share of the training rows out, so a split's n-th row is
not the data's n-th row. Chat-template errors already named the stored row (`row_errors.rows_as_stored`); token ids
outside the vocabulary, pre-tokenized rows of the wrong length and their `labels`/`attention_mask` errors named
their place in the split (bad rows 5, 7, 9 were named 7, 0, 26).
"""

import types

import datasets
import numpy as np
import pytest
from transformers import AutoTokenizer

from easytrain import BaseTrainer, TrainingArguments
from easytrain.data import DataError
from easytrain.data.preference_data import tokenize_preference_dataset
from easytrain.data.sft import tokenize_sft_dataset
from easytrain.data.sources import load_text_datasets
from easytrain.data.token_range import TokenRangeError
from easytrain.trainers.dpo import DPOTrainer
from easytrain.trainers.sft import SFTTrainer
from model_configs import tiny_config

LENGTH = 16  # max_length; pre-tokenized rows hold LENGTH + 1 ids
ROWS = 64
EXTRA = "<extra_token>"


def _args(tmp_path, **kwargs) -> TrainingArguments:
    values = dict(output_dir=str(tmp_path / "run"), max_steps=1, max_length=LENGTH, train_batch_size=4,
                  eval_batch_size=4, save_strategy="no", eval_strategy="no", save_pretrained_at_end=False,
                  report_to=["none"], disable_progress_bar=True, seed=42)
    return TrainingArguments(**(values | kwargs))


def _moved(rows: datasets.Dataset, bad_row: int, percentage: int = 5, seed: int = 42) -> str:
    """The split the hold-out puts `bad_row` in, checked to be at another position there (else the test proves
    nothing)."""
    splits = load_text_datasets(dataset=rows, validation_split_percentage=percentage, seed=seed)
    for name, split in splits.items():
        stored = split._indices.column(0).to_pylist()
        if bad_row in stored:
            assert stored.index(bad_row) != bad_row, "pick another seed: the split keeps the row where it was"
            return name
    raise AssertionError("the bad row is in no split")


def _blocks(edit) -> datasets.Dataset:
    rng = np.random.default_rng(0)
    rows = {"input_ids": rng.integers(3, 50, (ROWS, LENGTH + 1)).tolist()}
    edit(rows)
    return datasets.Dataset.from_dict(rows)


def _set(row: int, position: int, value: int):
    def edit(rows):
        rows["input_ids"][row][position] = value
    return edit


@pytest.mark.parametrize("bad_row, edit, expected", [
    (5, _set(5, 3, 100000), "field 'input_ids', row 5, position 3 holds token id 100000"),
    (7, _set(7, 2, -1), "field 'input_ids', row 7, position 2 holds token id -1"),
    (9, lambda rows: rows["input_ids"].__setitem__(9, rows["input_ids"][9][:10]), "row 9 holds 10 tokens"),
])
def test_pretokenized_rows_are_named_as_stored(tmp_path, tokenizer_dir, bad_row, edit, expected):
    rows = _blocks(edit)
    name = _moved(rows, bad_row)
    trainer = BaseTrainer(_args(tmp_path), tokenizer=tokenizer_dir, dataset_train=rows)
    with pytest.raises(DataError) as info:
        trainer.prepare_datasets()
    assert expected in str(info.value) and f"the {name!r} split" in str(info.value), str(info.value)


def test_the_row_a_length_error_compares_with_is_named_as_stored(tmp_path, tokenizer_dir):
    rows = _blocks(lambda rows: rows["input_ids"].__setitem__(9, rows["input_ids"][9][:10]))
    first = load_text_datasets(dataset=rows, validation_split_percentage=5, seed=42)["train"]._indices[0][0].as_py()
    assert first != 0
    with pytest.raises(DataError, match=rf"\(row {first} holds {LENGTH + 1}\)"):
        BaseTrainer(_args(tmp_path), tokenizer=tokenizer_dir, dataset_train=rows).prepare_datasets()


@pytest.mark.parametrize("column, value, expected", [
    ("labels", 2, "row 11, column 'labels', position 4 holds"),
    ("attention_mask", 7, "row 11, column 'attention_mask', position 4 holds"),
])
def test_labels_and_attention_mask_errors_name_the_stored_row(tmp_path, tokenizer_dir, column, value, expected):
    def edit(rows):
        rows[column] = [list(ids) if column == "labels" else [1] * len(ids) for ids in rows["input_ids"]]
        rows[column][11][4] = value if column == "attention_mask" else rows["input_ids"][11][4] + 1
    rows = _blocks(edit)
    name = _moved(rows, 11)
    with pytest.raises(DataError) as info:
        BaseTrainer(_args(tmp_path), tokenizer=tokenizer_dir, dataset_train=rows).prepare_datasets()
    assert expected in str(info.value) and f"the {name!r} split" in str(info.value), str(info.value)


def test_a_mask_column_of_the_wrong_length_names_the_stored_row(tmp_path, tokenizer_dir):
    def edit(rows):
        rows["labels"] = [list(ids) for ids in rows["input_ids"]]
        rows["labels"][11] = rows["labels"][11][:-1]
    rows = _blocks(edit)
    _moved(rows, 11)
    with pytest.raises(DataError, match=r"row 11's 'labels' holds 16 values"):
        BaseTrainer(_args(tmp_path), tokenizer=tokenizer_dir, dataset_train=rows).prepare_datasets()


@pytest.fixture(scope="module")
def grown_tokenizer(tokenizer_dir):
    """The test tokenizer with one token added past the model's vocabulary (`len(tokenizer) - 1`)."""
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    tokenizer.add_tokens([EXTRA])
    return tokenizer


def _model(vocab_size: int) -> types.SimpleNamespace:
    """What data preparation reads of a given model: its config."""
    return types.SimpleNamespace(config=tiny_config(vocab_size=vocab_size))


def test_sft_token_range_names_the_stored_example(tmp_path, grown_tokenizer):
    vocab, bad_row = len(grown_tokenizer) - 1, 6  # held in the training split
    examples = [{"prompt": f"{i}+1=", "completion": str(i + 1)} for i in range(40)]
    examples[bad_row]["completion"] = f"7 {EXTRA}"
    rows = datasets.Dataset.from_list(examples)
    name = _moved(rows, bad_row)
    trainer = SFTTrainer(_args(tmp_path), tokenizer=grown_tokenizer, model=_model(vocab), dataset_train=rows)
    with pytest.raises(TokenRangeError, match=rf"SFT examples of the {name!r} split hold .*field 'input_ids', "
                                              rf"row {bad_row}, .*token id {vocab}") as info:
        trainer.prepare_datasets()
    assert info.value.row == bad_row
    shuffled = rows.shuffle(seed=0)
    assert shuffled._indices.column(0).to_pylist().index(bad_row) != bad_row
    with pytest.raises(TokenRangeError, match=rf"row {bad_row}, "):  # formatted first: still the stored row
        tokenize_sft_dataset(shuffled, grown_tokenizer, vocab_size=vocab, formatting_func=dict)


def test_dpo_token_range_names_the_stored_pair(tmp_path, grown_tokenizer):
    vocab, bad_row = len(grown_tokenizer) - 1, 7  # held out for validation
    pairs = [{"prompt": f"{i}+1=", "chosen": str(i + 1), "rejected": str(i + 2)} for i in range(40)]
    pairs[bad_row]["rejected"] = f"9 {EXTRA}"
    rows = datasets.Dataset.from_list(pairs)
    name = _moved(rows, bad_row)
    trainer = DPOTrainer(_args(tmp_path), tokenizer=grown_tokenizer, model=_model(vocab), dataset_train=rows)
    with pytest.raises(TokenRangeError, match=rf"Preference pairs of the {name!r} split hold .*field "
                                              rf"'rejected_input_ids', row {bad_row}, .*token id {vocab}"):
        trainer.prepare_datasets()
    with pytest.raises(TokenRangeError, match=rf"row {bad_row}, "):
        tokenize_preference_dataset(rows.select(range(39, -1, -1)), grown_tokenizer, vocab_size=vocab)
