"""Generation eval of validation rows whose answer is an assistant tool call with no text (content null, valid for
training): such a row gives no text to compare a generation with, so it is skipped and counted with the prompts
that training's cut leaves without an answer, instead of refusing the data."""

import logging

import datasets
import pytest
from chat_fixtures import build_chat_tokenizer

from easytrain.data import DataError
from easytrain.data.prompts import prompt_and_reference, prompts_and_references
from easytrain.data.sft import SFTDataOptions, tokenize_sft_dataset

CALL = [{"type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]


def chat(answer, tool_calls=None):
    return {"messages": [{"role": "user", "content": "weather in Paris?", "tool_calls": None},
                         {"role": "assistant", "content": answer, "tool_calls": tool_calls}]}


@pytest.fixture(scope="module")
def llama3():
    return build_chat_tokenizer("llama3")


def test_a_tool_call_answer_is_trained_and_skipped_by_generation_eval(llama3, caplog):
    rows = datasets.Dataset.from_list([chat("Sunny."), chat(None, CALL), chat("Rain.")])
    options = SFTDataOptions(max_length=256)
    assert tokenize_sft_dataset(rows, llama3, options)[1]["num_kept"] == 3
    with caplog.at_level(logging.WARNING, logger="easytrain"):
        prompts, references = prompts_and_references(rows, llama3, options=options)
    assert references == ["Sunny.", "Rain."] and len(prompts) == 2
    assert any("1 of the 3" in r.getMessage() and "tool call" in r.getMessage() for r in caplog.records), caplog.text
    assert prompt_and_reference(rows[1], llama3, "conversational", options) == ([], "")


def test_a_completion_ending_in_a_tool_call_is_skipped(llama3):
    row = {"prompt": [{"role": "user", "content": "weather?", "tool_calls": None}],
           "completion": [{"role": "assistant", "content": None, "tool_calls": CALL}]}
    assert prompt_and_reference(row, llama3, "prompt_completion", SFTDataOptions(max_length=256)) == ([], "")


def test_when_every_answer_is_a_tool_call_the_error_says_so(llama3):
    rows = datasets.Dataset.from_list([chat(None, CALL)] * 2)
    with pytest.raises(DataError) as info:
        prompts_and_references(rows, llama3, options=SFTDataOptions(max_length=256))
    text = str(info.value)
    assert "2 examples" in text and "tool call" in text and "generation_eval_samples" in text, text
    assert "Raise `max_length`" not in text, text


def test_a_null_answer_without_a_tool_call_is_still_refused(llama3):
    rows = datasets.Dataset.from_list([chat("Sunny."), chat(None)])
    with pytest.raises(DataError, match="'content'"):
        prompts_and_references(rows, llama3, options=SFTDataOptions(max_length=256))
