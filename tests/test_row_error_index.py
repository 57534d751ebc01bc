"""A bad example is named by its row in the data as given, not by its place in a held-out or shuffled split.

``load_text_datasets`` holds a shuffled validation split out of the training rows; the row a user looks up in
their file is the file's, so an error found while tokenising either split must name that row.
"""

import json

import datasets
import pytest
from chat_fixtures import ANSWER, STRICT, USER, build_chat_tokenizer

from easytrain import TrainingArguments
from easytrain.cli import main
from easytrain.data import DataError
from easytrain.data.preference_data import PreferenceDataOptions, tokenize_preference_dataset
from easytrain.data.prompts import prompts_and_references
from easytrain.data.row_errors import RowError
from easytrain.data.sft import SFTDataOptions, tokenize_sft_dataset
from easytrain.data.sources import load_text_datasets
from easytrain.tasks.arithmetic import CHAT_TEMPLATE, build_arithmetic_chat_tokenizer
from easytrain.trainers.sft import SFTArguments, SFTTrainer

NUM_ROWS = 40


@pytest.fixture(scope="module")
def strict():
    tokenizer = build_chat_tokenizer("mistral")
    tokenizer.chat_template = STRICT
    return tokenizer


def _lines(bad_row: int) -> list[dict]:
    return [{"messages": [USER, USER, ANSWER] if i == bad_row else [USER, ANSWER]} for i in range(NUM_ROWS)]


def _write(tmp_path, bad_row: int):
    path = tmp_path / "chat.jsonl"
    path.write_text("\n".join(json.dumps(line) for line in _lines(bad_row)))
    return path


def _split_holding(splits: datasets.DatasetDict, bad_row: int) -> tuple[str, int]:
    """Which split holds the bad row, and at which position (not the file's row, or the test proves nothing)."""
    for name, split in splits.items():
        for position, example in enumerate(split):
            if len(example["messages"]) == 3:
                assert position != bad_row, "pick another seed: the split keeps the row where it was"
                return name, position
    raise AssertionError("the bad row is in no split")


@pytest.mark.parametrize("held_out", [False, True])
def test_sft_error_names_the_files_row_in_either_split(tmp_path, strict, held_out):
    splits = load_text_datasets(train_file=_write(tmp_path, 17), validation_split_percentage=20, seed=3)
    bad_row = 17
    name, _ = _split_holding(splits, bad_row)
    if (name == "validation") != held_out:  # move the bad row to the other split: find a row the split put there
        other = "validation" if held_out else "train"
        bad_row = int(splits[other]._indices.column(0)[5].as_py())
        splits = load_text_datasets(train_file=_write(tmp_path, bad_row), validation_split_percentage=20, seed=3)
        name, _ = _split_holding(splits, bad_row)
        assert name == other
    with pytest.raises(RowError) as info:
        tokenize_sft_dataset(splits[name], strict, SFTDataOptions(assistant_only_loss=True))
    assert info.value.row == bad_row, str(info.value)
    assert f"Example {bad_row} (0-based row index)" in str(info.value)


def test_row_is_the_given_datasets_after_a_selection_and_formatting(strict):
    rows = datasets.Dataset.from_list([{"turns": example["messages"]} for example in _lines(9)])
    splits = load_text_datasets(dataset=rows, validation_split_percentage=10, seed=1)
    name, _ = _split_holding(datasets.DatasetDict({k: v.rename_column("turns", "messages")
                                                   for k, v in splits.items()}), 9)
    limited = splits[name].select(range(len(splits[name])))  # max_train_samples' selection keeps the mapping
    with pytest.raises(RowError) as info:
        tokenize_sft_dataset(limited, strict, formatting_func=lambda example: {"messages": example["turns"]},
                             num_proc=2)
    assert info.value.row == 9, str(info.value)


def test_generation_prompts_name_the_files_row(tmp_path, strict):
    splits = load_text_datasets(train_file=_write(tmp_path, 0), validation_split_percentage=50, seed=0)
    validation = splits["validation"]
    bad_row = int(validation._indices.column(0)[2].as_py())
    splits = load_text_datasets(train_file=_write(tmp_path, bad_row), validation_split_percentage=50, seed=0)
    with pytest.raises(RowError) as info:
        prompts_and_references(splits["validation"], strict)
    assert info.value.row == bad_row and info.value.row != 2, str(info.value)


def test_a_dataset_without_a_selection_keeps_its_positions(strict):
    rows = datasets.Dataset.from_list(_lines(6))
    with pytest.raises(DataError, match=r"Example 6 \(0-based row index\)"):
        tokenize_sft_dataset(rows, strict)


def test_the_cli_names_the_files_row(tmp_path, strict, capsys):
    strict.save_pretrained(tmp_path / "tokenizer")
    bad_row = 11
    path = _write(tmp_path, bad_row)
    splits = load_text_datasets(train_file=path, validation_split_percentage=5, seed=42)
    name, position = _split_holding(splits, bad_row)
    status = main(["train", "--task", "sft", "--output_dir", str(tmp_path / "run"), "--max_steps", "2",
                   "--max_length", "32", "--train_batch_size", "4", "--train_file", str(path), "--seed", "42",
                   "--tokenizer_name", str(tmp_path / "tokenizer"), "--report_to", "none",
                   "--disable_progress_bar", "--no_save_pretrained_at_end"])
    err = capsys.readouterr().err
    assert status == 2, err[-2000:]
    assert f"Example {bad_row} (0-based row index) of the {name!r} split" in err, (position, err[-2000:])


def test_preference_errors_name_the_files_row(tmp_path, strict):
    """DPO pairs too: a prompt the template refuses is named by the file's row, not its place in the split."""
    lines = [{"prompt": [USER, USER] if i == 13 else [USER], "chosen": [ANSWER],
              "rejected": [{"role": "assistant", "content": "five"}]} for i in range(NUM_ROWS)]
    path = tmp_path / "pairs.jsonl"
    path.write_text("\n".join(json.dumps(line) for line in lines))
    splits = load_text_datasets(train_file=path, validation_split_percentage=20, seed=3)
    name = next(name for name, split in splits.items() if 13 in split._indices.column(0).to_pylist())
    assert splits[name]._indices.column(0).to_pylist().index(13) != 13, "the split keeps the row where it was"
    with pytest.raises(RowError) as info:
        tokenize_preference_dataset(splits[name], strict, PreferenceDataOptions(max_length=64))
    assert info.value.row == 13, str(info.value)


def test_sft_generation_prompts_after_a_formatting_func_name_the_given_row(tmp_path):
    """The trainer formats the held-out rows again for its generation prompts: a prompt the template refuses (here
    only with `add_generation_prompt`, so tokenising passed) is still named by the row of the data given."""
    rows = datasets.Dataset.from_list([{"question": f"{i}+1", "answer": str(i + 1)} for i in range(40)])
    seed = 42
    validation = load_text_datasets(dataset=rows, validation_split_percentage=20, seed=seed)["validation"]
    bad_row = int(validation._indices.column(0)[1].as_py())
    assert bad_row != 1, "pick another seed: the split keeps the row where it was"
    tokenizer = build_arithmetic_chat_tokenizer()
    tokenizer.chat_template = ("{% if add_generation_prompt and messages[-1]['content'] == '" + f"{bad_row}+1" +
                               "' %}{{ raise_exception('no prompt for this one') }}{% endif %}" + CHAT_TEMPLATE)

    def to_chat(example):
        return {"messages": [{"role": "user", "content": example["question"]},
                             {"role": "assistant", "content": example["answer"]}]}

    args = TrainingArguments(output_dir=str(tmp_path / "run"), max_length=32, train_batch_size=8, eval_batch_size=8,
                             max_steps=1, eval_strategy="no", save_strategy="no", report_to=["none"], seed=seed,
                             disable_progress_bar=True, save_pretrained_at_end=False, validation_split_percentage=20)
    trainer = SFTTrainer(args, SFTArguments(generation_eval_samples=4, max_new_tokens=3), tokenizer=tokenizer,
                         dataset_train=rows, formatting_func=to_chat)
    with pytest.raises(DataError, match=rf"Example {bad_row} \(0-based row index\) of the 'validation' split"):
        trainer.prepare_datasets()
