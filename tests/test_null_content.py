"""A user, assistant or system message with a null `content` and no `tool_calls` is refused before rendering.

Arrow's null fields are dropped before rendering, so a template that prints `message['content']` renders an empty
string: the row trained silently as an empty answer (only the end-of-turn token supervised). An assistant message
with `tool_calls` and a null content is OpenAI's format for a tool call, and still renders.
"""

import json

import datasets
import pytest
from chat_fixtures import CHAT, TOOL_CHAT, WEATHER_TOOL, build_chat_tokenizer

from easytrain import TrainingArguments
from easytrain.data import DataError
from easytrain.data.preference_data import tokenize_preference_dataset
from easytrain.data.row_errors import RowError
from easytrain.data.sft import SFTDataOptions, tokenize_sft_dataset
from easytrain.tasks.arithmetic import build_arithmetic_chat_tokenizer
from easytrain.trainers.sft import SFTTrainer


def _chats(count: int, bad_row: int, bad_message: dict) -> list[dict]:
    rows = [{"messages": [{"role": "user", "content": f"{i}+1"}, {"role": "assistant", "content": str(i + 1)}]}
            for i in range(count)]
    rows[bad_row]["messages"][1 if bad_message["role"] == "assistant" else 0] = bad_message
    return rows


@pytest.mark.parametrize("role", ["assistant", "user"])
def test_a_null_content_is_refused_naming_the_row_and_the_message(role):
    rows = datasets.Dataset.from_list(_chats(6, 3, {"role": role, "content": None}))
    with pytest.raises(RowError) as info:  # it trained as `<|assistant|><|end|>`, only <|end|> supervised
        tokenize_sft_dataset(rows, build_arithmetic_chat_tokenizer(),
                             SFTDataOptions(max_length=32, assistant_only_loss=True))
    text = str(info.value)
    assert info.value.row == 3, text
    index = 1 if role == "assistant" else 0
    assert f"'messages' message {index} (role {role!r}) has a null 'content' and no 'tool_calls'" in text, text


def test_a_null_system_content_is_refused_even_where_the_template_skips_system():
    rows = [{"messages": [{"role": "system", "content": None}, *row["messages"]]} for row in _chats(4, 0, {
        "role": "user", "content": "0+1"})]
    with pytest.raises(DataError, match=r"message 0 \(role 'system'\) has a null 'content'"):
        tokenize_sft_dataset(datasets.Dataset.from_list(rows), build_arithmetic_chat_tokenizer(),
                             SFTDataOptions(max_length=32))


def test_a_tool_call_with_a_null_content_still_renders():
    """OpenAI's tool-call messages carry `content: null`; the template renders the call instead."""
    chat = [dict(message) for message in TOOL_CHAT]
    chat[1] = {**chat[1], "content": None}
    tokenizer = build_chat_tokenizer("chatml")
    tokenized, stats = tokenize_sft_dataset(
        datasets.Dataset.from_list([{"messages": chat, "tools": json.dumps([WEATHER_TOOL])}, {"messages": CHAT}]),
        tokenizer, SFTDataOptions(assistant_only_loss=True, max_length=None))
    assert stats["num_kept"] == 2
    assert "get_weather" in tokenizer.decode(tokenized[0]["input_ids"])


def test_shared_rows_with_missing_keys_are_not_refused():
    """Arrow fills a key only some messages have with null: `tool_calls` null beside a content is no tool call,
    and a content null beside tool calls is one."""
    rows = datasets.Dataset.from_list([{"messages": TOOL_CHAT}, {"messages": CHAT}])
    assert rows[1]["messages"][0]["tool_calls"] is None  # the key Arrow added
    _, stats = tokenize_sft_dataset(rows, build_chat_tokenizer("chatml"), SFTDataOptions(max_length=None))
    assert stats["num_kept"] == 2


def test_a_preference_pair_with_a_null_reply_is_refused_naming_the_pair():
    good = {"prompt": [{"role": "user", "content": "1+1"}], "chosen": [{"role": "assistant", "content": "2"}],
            "rejected": [{"role": "assistant", "content": "3"}]}
    rows = [good] * 5 + [{**good, "rejected": [{"role": "assistant", "content": None}]}]
    with pytest.raises(RowError) as info:
        tokenize_preference_dataset(datasets.Dataset.from_list(rows), build_arithmetic_chat_tokenizer(),
                                    vocab_size=None)
    assert info.value.row == 5 and "'rejected' message 0 (role 'assistant') has a null 'content'" in str(info.value)


def test_the_trainer_names_the_split_and_the_stored_row(tmp_path):
    bad_row = 3
    rows = datasets.Dataset.from_list(_chats(40, bad_row, {"role": "assistant", "content": None}))
    arguments = TrainingArguments(output_dir=str(tmp_path / "run"), max_length=32, max_steps=1, train_batch_size=4,
                                  report_to=["none"], disable_progress_bar=True, save_pretrained_at_end=False,
                                  validation_split_percentage=10, seed=0)
    trainer = SFTTrainer(arguments, tokenizer=build_arithmetic_chat_tokenizer(), dataset_train=rows)
    with pytest.raises(RowError, match=rf"Example {bad_row} \(0-based row index\) of the '(train|validation)' "
                                       r"split: 'messages' message 1 \(role 'assistant'\) has a null 'content'"):
        trainer.prepare_datasets()
