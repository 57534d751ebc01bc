"""SFT's `text_column`: plain-text examples come from the named column, from the library and from the command
line; a value it cannot honour (conversations, prompt-completion rows, a formatting_func, a missing column) is
refused by name; and the rows it selects are what the resume checks compare."""

import json

import datasets
import pytest

from easytrain import ArgumentError, TrainingArguments
from easytrain.cli import main
from easytrain.data import DataError
from easytrain.data.sft import detect_format
from easytrain.trainers.sft import SFTTrainer
from runs import StopAt

BODY = "The quick brown fox jumps over the lazy dog number {}."


def tiny_args(tmp_path, **overrides) -> TrainingArguments:
    values = dict(output_dir=str(tmp_path / "run"), max_length=32, train_batch_size=4, eval_batch_size=4,
                  max_steps=2, logging_steps=1, eval_strategy="no", save_strategy="no", report_to=["jsonl"],
                  disable_progress_bar=True, save_pretrained_at_end=False, validation_split_percentage=0)
    return TrainingArguments(**(values | overrides))


def rows(with_text: bool = True, count: int = 16) -> datasets.Dataset:
    return datasets.Dataset.from_list([{**({"text": "zzz"} if with_text else {}), "body": BODY.format(i)}
                                       for i in range(count)])


def supervised_text(trainer) -> str:
    batch = next(trainer.dataloaders.train.iterator(0))
    return " ".join(trainer.tokenizer.decode(targets[mask > 0].tolist())
                    for targets, mask in zip(batch["targets"], batch["loss_mask"]))


@pytest.mark.parametrize("with_text", [True, False])
def test_plain_text_comes_from_the_text_column(tmp_path, tokenizer, with_text):
    trainer = SFTTrainer(tiny_args(tmp_path, text_column="body"), tokenizer=tokenizer, dataset_train=rows(with_text))
    text = supervised_text(trainer)
    assert "quick brown fox" in text and "zzz" not in text, text


def test_the_default_text_column_is_unchanged(tmp_path, tokenizer):
    trainer = SFTTrainer(tiny_args(tmp_path), tokenizer=tokenizer, dataset_train=rows())
    text = supervised_text(trainer)
    assert "zzz" in text and "quick" not in text, text


def test_the_cli_trains_on_the_text_column(tmp_path, tokenizer_dir):
    path = tmp_path / "body.jsonl"
    path.write_text("\n".join(json.dumps({"text": "zzz", "body": BODY.format(i)}) for i in range(16)))
    output = tmp_path / "run"
    status = main(["train", "--task", "sft", "--train_file", str(path), "--text_column", "body", "--tokenizer_name",
                   tokenizer_dir, "--output_dir", str(output), "--max_steps", "1", "--max_length", "32",
                   "--train_batch_size", "4", "--validation_split_percentage", "0", "--save_strategy", "no",
                   "--report_to", "none", "--disable_progress_bar", "--no_save_pretrained_at_end"])
    assert status == 0
    stats = json.loads((output / "sft_data_stats.json").read_text())["train"]
    assert stats["num_kept"] == 16 and stats["num_tokens"] > 16 * 5, stats  # the sentences, not "zzz"


@pytest.mark.parametrize("row", [
    {"messages": [{"role": "user", "content": "1+1"}, {"role": "assistant", "content": "2"}], "body": "x"},
    {"prompt": "1+1=", "completion": "2", "body": "x"},
], ids=["conversation", "prompt-completion"])
def test_a_text_column_over_other_formats_is_refused_by_name(tmp_path, tokenizer, row):
    with pytest.raises(ArgumentError, match=r"text_column: 'body' selects plain text.*(messages|prompt)"):
        SFTTrainer(tiny_args(tmp_path, text_column="body"), tokenizer=tokenizer,
                   dataset_train=datasets.Dataset.from_list([row] * 8)).setup()


def test_a_missing_text_column_lists_the_columns(tmp_path, tokenizer):
    with pytest.raises(ArgumentError, match=r"text_column: 'content' is not a column .*'body', 'text'"):
        SFTTrainer(tiny_args(tmp_path, text_column="content"), tokenizer=tokenizer, dataset_train=rows()).setup()


def test_a_text_column_with_a_formatting_func_is_refused(tmp_path, tokenizer):
    with pytest.raises(ArgumentError, match=r"text_column: .*formatting_func"):
        SFTTrainer(tiny_args(tmp_path, text_column="body"), tokenizer=tokenizer, dataset_train=rows(),
                   formatting_func=lambda example: {"text": example["body"]}).setup()


def test_the_data_digest_is_of_the_selected_column(tmp_path, tokenizer):
    digests = {column: SFTTrainer(tiny_args(tmp_path / column, text_column=column), tokenizer=tokenizer,
                                  dataset_train=rows()).dataloaders.train.data_digest for column in ("text", "body")}
    assert digests["text"] != digests["body"]
    same = SFTTrainer(tiny_args(tmp_path / "again", text_column="body"), tokenizer=tokenizer,
                      dataset_train=rows()).dataloaders.train.data_digest
    assert same == digests["body"]


def test_resuming_under_another_text_column_is_refused_before_compute(tmp_path, tokenizer):
    saving = dict(save_strategy="steps", save_steps=2, max_steps=4)
    data = datasets.Dataset.from_list([{"text": BODY.format(-i), "body": BODY.format(i)} for i in range(16)])
    SFTTrainer(tiny_args(tmp_path, text_column="body", **saving), tokenizer=tokenizer, dataset_train=data,
               callbacks=[StopAt(2)]).train()
    with pytest.raises(ArgumentError, match="text_column: checkpoint 'body' vs now 'text'"):
        SFTTrainer(tiny_args(tmp_path, resume_from_checkpoint="latest", **saving), tokenizer=tokenizer,
                   dataset_train=data).setup()



def test_rows_of_no_format_point_to_text_column():
    """A file whose plain text sits under another name (`body`) is told of `text_column`, not only of renaming."""
    with pytest.raises(DataError, match="set `text_column` to the column holding plain text"):
        detect_format(["body"])
