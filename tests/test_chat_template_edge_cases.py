"""Chat-template and formatting edge cases real data meets.

A template printing today's date (Llama 3.1/3.2's ``strftime_now``) must render the same ids on every
day and process; named templates pick ``tool_use`` for rows with tools, as transformers does; a generation
block that leaves the end-of-turn token out is warned about; row errors name the user's ``text_column``; a
``formatting_func`` returning the wrong shape is refused naming it, the row and what it returned.
"""

import json
import logging

import datasets
import pytest
from chat_fixtures import CHATML, TOOL_CHAT, WEATHER_TOOL, build_chat_tokenizer

from easytrain.data import DataError
from easytrain.data.preference_data import tokenize_preference_dataset
from easytrain.data.sft import CONVERSATIONAL, SFTDataOptions, tokenize_example, tokenize_sft_dataset
from easytrain.trainers.sft import text_from_column

DATED = (
    "{{ bos_token }}{%- if not date_string is defined %}{%- if strftime_now is defined %}"
    "{%- set date_string = strftime_now('%d %b %Y') %}{%- else %}{%- set date_string = 'no clock' %}{%- endif %}"
    "{%- endif %}{{ '<|start_header_id|>system<|end_header_id|>\\n\\nToday Date: ' + date_string + '<|eot_id|>' }}"
    "{% for m in messages %}{{ '<|start_header_id|>' + m.role + '<|end_header_id|>\\n\\n' }}"
    "{% if m.role == 'assistant' %}{% generation %}{{ m.content + '<|eot_id|>' }}{% endgeneration %}"
    "{% else %}{{ m.content + '<|eot_id|>' }}{% endif %}{% endfor %}"
)
CHAT = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "four"}]
OPTIONS = SFTDataOptions(assistant_only_loss=True, max_length=None)


def _rows(*rows: dict) -> datasets.Dataset:
    return datasets.Dataset.from_list(list(rows))


def test_strftime_now_renders_a_fixed_date():
    tokenizer = build_chat_tokenizer("llama3")
    example = tokenize_example({"messages": CHAT}, tokenizer, SFTDataOptions(chat_template=DATED), CONVERSATIONAL)
    text = tokenizer.decode(example.input_ids)
    assert "Today Date: 26 Jul 2024<|eot_id|>" in text, text


def test_strftime_now_fixed_date_keeps_the_mask_on_the_reply():
    tokenizer = build_chat_tokenizer("llama3")
    options = SFTDataOptions(chat_template=DATED, assistant_only_loss=True, max_length=None)
    example = tokenize_example({"messages": CHAT}, tokenizer, options, CONVERSATIONAL)
    supervised = [token for token, bit in zip(example.input_ids, example.loss_mask, strict=True) if bit]
    assert tokenizer.decode(supervised) == "four<|eot_id|>"


def _named_tokenizer(named: dict):
    tokenizer = build_chat_tokenizer("chatml")
    tokenizer.chat_template = named
    return tokenizer


def test_named_templates_render_rows_with_tools_with_tool_use():
    no_tools = CHATML.replace("{% if tools %}", "{% if false %}")
    tokenizer = _named_tokenizer({"default": no_tools, "tool_use": CHATML})
    rows = _rows({"messages": TOOL_CHAT, "tools": json.dumps([WEATHER_TOOL])}, {"messages": TOOL_CHAT, "tools": None})
    tokenized, _ = tokenize_sft_dataset(rows, tokenizer, OPTIONS)
    assert "Tools:" in tokenizer.decode(tokenized[0]["input_ids"])
    assert "Tools:" not in tokenizer.decode(tokenized[1]["input_ids"])


def test_named_templates_without_default_are_refused_by_name():
    tokenizer = _named_tokenizer({"tool_use": CHATML})
    with pytest.raises(DataError, match=r"named chat templates \['tool_use'\] but no 'default'"):
        tokenize_sft_dataset(_rows({"messages": CHAT}), tokenizer, OPTIONS)


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


@pytest.mark.parametrize("inside", [False, True])
def test_end_of_turn_outside_the_generation_block_is_warned_once(inside):
    tokenizer = build_chat_tokenizer("chatml")
    block = "{{ m.content + '<|im_end|>' }}{% endgeneration %}" if inside else \
        "{{ m.content }}{% endgeneration %}{{ '<|im_end|>' }}"
    template = ("{% for m in messages %}{{ '<|im_start|>' + m.role + '\\n' }}{% if m.role == 'assistant' %}"
                "{% generation %}" + block + "{% else %}{{ m.content + '<|im_end|>' }}{% endif %}"
                "{{ '\\n' }}{% endfor %}" + ("{#" + str(inside) + " edge-cases #}"))
    records = _Records()
    logging.getLogger("easytrain").addHandler(records)
    try:
        for _ in range(2):
            tokenize_example({"messages": CHAT}, tokenizer, SFTDataOptions(chat_template=template,
                                                                          assistant_only_loss=True), CONVERSATIONAL)
    finally:
        logging.getLogger("easytrain").removeHandler(records)
    warned = [message for message in records.messages if "learn to stop" in message]
    assert len(warned) == (0 if inside else 1), records.messages
    if not inside:
        assert "'<|im_end|>'" in warned[0] and "{% generation %}" in warned[0]


def test_text_column_errors_name_the_users_column():
    tokenizer = build_chat_tokenizer("chatml")
    split = _rows({"body": "hello world"}, {"body": None}, {"body": "the quick fox"})
    with pytest.raises(DataError) as info:
        tokenize_sft_dataset(text_from_column(split, "body", False), tokenizer, SFTDataOptions(text_column="body"))
    text = str(info.value)
    assert "Example 1 (0-based row index)" in text and "'body'" in text and "text_column" in text, text


QA = [{"question": "2+2", "answer": "4"}, {"question": "3+3", "answer": "6"}]


@pytest.mark.parametrize("returned, shown", [
    (lambda row: f"Q: {row['question']} A: {row['answer']}", "str"),
    (lambda row: None, "NoneType"),
    (lambda row: {"body": row["question"]}, "['body']"),
])
def test_sft_formatting_func_wrong_shape_is_named(returned, shown):
    tokenizer = build_chat_tokenizer("chatml")
    with pytest.raises(DataError) as info:
        tokenize_sft_dataset(_rows(*QA), tokenizer, SFTDataOptions(), formatting_func=returned)
    text = str(info.value)
    assert "`formatting_func`" in text and "Example 0 (0-based row index)" in text and shown in text, text
    assert "{text}" in text and "{messages}" in text, text


def test_sft_formatting_func_right_shape_still_works():
    tokenizer = build_chat_tokenizer("chatml")
    tokenized, stats = tokenize_sft_dataset(_rows(*QA), tokenizer, SFTDataOptions(),
                                            formatting_func=lambda row: {"text": row["question"]})
    assert stats["num_kept"] == 2


def test_preference_formatting_func_wrong_shape_is_named():
    tokenizer = build_chat_tokenizer("chatml")
    with pytest.raises(DataError) as info:
        tokenize_preference_dataset(_rows(*QA), tokenizer, formatting_func=lambda row: row["question"])
    text = str(info.value)
    assert "`formatting_func`" in text and "Example 0 (0-based row index)" in text and "str" in text, text
    assert "{prompt, chosen, rejected}" in text, text


def test_generation_prompts_of_rows_with_tools_render_with_tool_use():
    """Evaluation by generation renders its prompts as training rendered the rows: with the named template chosen
    for the row's tools, so the prompt is a prefix of the trained ids."""
    from easytrain.data.prompts import prompt_and_reference

    no_tools = CHATML.replace("{% if tools %}", "{% if false %}")
    tokenizer = _named_tokenizer({"default": no_tools, "tool_use": CHATML})
    row = {"messages": TOOL_CHAT, "tools": json.dumps([WEATHER_TOOL])}
    prompt_ids, _ = prompt_and_reference(row, tokenizer, CONVERSATIONAL, OPTIONS)
    assert "Tools:" in tokenizer.decode(prompt_ids)


def test_a_tool_use_template_without_markers_is_refused_only_for_rows_with_tools():
    """Rows without tools render with `default`: its markers are what assistant_only_loss needs; a row with tools
    that would render with an unmarked `tool_use` is refused, naming the row."""
    unmarked = CHATML.replace("{% generation %}", "").replace("{% endgeneration %}", "")
    tokenizer = _named_tokenizer({"default": CHATML, "tool_use": unmarked})
    tokenized, _ = tokenize_sft_dataset(_rows({"messages": CHAT}, {"messages": CHAT}), tokenizer, OPTIONS)
    assert len(tokenized) == 2
    with pytest.raises(DataError, match=r"Example 1 .*generation"):
        tokenize_sft_dataset(_rows({"messages": CHAT, "tools": None},
                                   {"messages": TOOL_CHAT, "tools": json.dumps([WEATHER_TOOL])}), tokenizer, OPTIONS)
