"""A chat template that fails on one row is a DataError naming the row and quoting the template, not a jinja2 error.

Two failures real data meets: a message whose ``content`` is null (the key is dropped, so a template that writes
``message.content`` meets an undefined value), and a template that refuses the conversation with
``raise_exception(...)`` (Llama 2 and Mistral templates demand alternating user/assistant roles).
"""

import json
import re

import datasets
import pytest
from chat_fixtures import ALTERNATE, ANSWER, STRICT, USER, build_chat_tokenizer

from easytrain.cli import main
from easytrain.data import DataError
from easytrain.data.preference_data import tokenize_preference_dataset
from easytrain.data.prompts import prompts_and_references
from easytrain.data.sft import SFTDataOptions, tokenize_sft_dataset

NULL_USER = {"role": "user", "content": None}
BAD_ROW = 7


@pytest.fixture(scope="module")
def chatml():
    return build_chat_tokenizer("chatml")


@pytest.fixture(scope="module")
def strict():
    tokenizer = build_chat_tokenizer("mistral")
    tokenizer.chat_template = STRICT
    return tokenizer


def _rows(good: dict, bad: dict, count: int = 10) -> datasets.Dataset:
    return datasets.Dataset.from_list([bad if i == BAD_ROW else good for i in range(count)])


def _check(error: DataError, quoted: str) -> None:
    text = str(error)
    assert f"example {BAD_ROW} (0-based row index)" in text.lower(), text
    assert quoted in text, text
    assert "chat template" in text and "fix" in text, text


def test_sft_null_content_names_the_row_and_the_undefined_field(chatml):
    rows = _rows({"messages": [USER, ANSWER]}, {"messages": [NULL_USER, ANSWER]})
    with pytest.raises(DataError) as info:
        tokenize_sft_dataset(rows, chatml, SFTDataOptions(assistant_only_loss=True))
    _check(info.value, "'content'")
    assert "null" in str(info.value)


def test_sft_template_raise_exception_names_the_row_and_quotes_the_message(strict):
    rows = _rows({"messages": [USER, ANSWER]}, {"messages": [USER, USER, ANSWER]})
    with pytest.raises(DataError) as info:
        tokenize_sft_dataset(rows, strict, SFTDataOptions(assistant_only_loss=True))
    _check(info.value, ALTERNATE)


def test_sft_row_index_is_absolute_across_worker_processes(strict):
    rows = _rows({"messages": [USER, ANSWER]}, {"messages": [USER, USER, ANSWER]})
    with pytest.raises(DataError) as info:  # the bad row is in the second shard
        tokenize_sft_dataset(rows, strict, SFTDataOptions(assistant_only_loss=True), num_proc=2)
    _check(info.value, ALTERNATE)


def test_sft_prompt_completion_messages_name_the_row(strict):
    rows = _rows({"prompt": [USER], "completion": [ANSWER]}, {"prompt": [USER, USER], "completion": [ANSWER]})
    with pytest.raises(DataError) as info:
        tokenize_sft_dataset(rows, strict)
    _check(info.value, ALTERNATE)


def test_dpo_null_content_names_the_row(chatml):
    good = {"prompt": [USER], "chosen": [ANSWER], "rejected": [{"role": "assistant", "content": "five"}]}
    rows = _rows(good, {**good, "prompt": [NULL_USER]})
    with pytest.raises(DataError) as info:
        tokenize_preference_dataset(rows, chatml)
    _check(info.value, "'content'")


def test_dpo_template_raise_exception_names_the_row(strict):
    good = {"prompt": [USER], "chosen": [ANSWER], "rejected": [{"role": "assistant", "content": "five"}]}
    rows = _rows(good, {**good, "prompt": [USER, USER]})
    with pytest.raises(DataError) as info:
        tokenize_preference_dataset(rows, strict)
    _check(info.value, ALTERNATE)


def test_generation_prompts_name_the_row(strict):
    rows = _rows({"messages": [USER, ANSWER]}, {"messages": [USER, USER, ANSWER]})
    with pytest.raises(DataError) as info:
        prompts_and_references(rows, strict)
    _check(info.value, ALTERNATE)


def test_other_row_errors_also_name_the_row(chatml):
    rows = _rows({"prompt": "2+2=", "completion": "4"}, {"prompt": "2+2=", "completion": None})
    with pytest.raises(DataError, match=f"(?i)example {BAD_ROW}.*'completion' must be a str"):
        tokenize_sft_dataset(rows, chatml)


def test_the_cli_exits_2_naming_the_template_failure(tmp_path, strict, capsys):
    strict.save_pretrained(tmp_path / "tokenizer")
    lines = [{"messages": [USER, ANSWER]}] * 20 + [{"messages": [USER, USER, ANSWER]}]
    (tmp_path / "chat.jsonl").write_text("\n".join(json.dumps(line) for line in lines))
    status = main(["train", "--task", "sft", "--output_dir", str(tmp_path / "run"), "--max_steps", "2",
                   "--max_length", "32", "--train_batch_size", "4", "--train_file", str(tmp_path / "chat.jsonl"),
                   "--tokenizer_name", str(tmp_path / "tokenizer"), "--report_to", "none",
                   "--disable_progress_bar", "--no_save_pretrained_at_end"])
    err = capsys.readouterr().err
    assert status == 2, err[-2000:]
    assert "easytrain: error:" in err and ALTERNATE in err and "Traceback" not in err, err[-2000:]
    assert re.search(r"Example \d+ \(0-based row index\) of the '(train|validation)' split", err), err[-2000:]
