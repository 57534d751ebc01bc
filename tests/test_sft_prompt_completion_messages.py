"""Prompt-completion MESSAGE rows are refused by name as conversations are: a named template (picked per row by
its tools) without generation markers under `assistant_only_loss`, and a completion with no assistant message."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import json

import datasets
import pytest
from chat_fixtures import CHATML, NO_MARKERS, WEATHER_TOOL, build_chat_tokenizer

from easytrain.data.row_errors import RowError
from easytrain.data.sft import SFTDataOptions, tokenize_sft_dataset

USER = {"role": "user", "content": "What is two plus two?"}
ANSWER = {"role": "assistant", "content": "four"}


def test_a_named_template_without_markers_is_refused_for_prompt_completion_messages():
    """{'default': no markers, 'tool_use': marked}: the rows without tools must be refused, not dropped silently
    with an all-zero mask."""
    tok = build_chat_tokenizer("chatml")
    tok.chat_template = {"default": NO_MARKERS, "tool_use": CHATML}
    rows = [{"prompt": [USER], "completion": [ANSWER], "tools": json.dumps([WEATHER_TOOL])}] * 2
    rows += [{"prompt": [USER], "completion": [ANSWER], "tools": "[]"}]
    with pytest.raises(RowError, match=r"Example 2 .*needs a chat template that wraps each assistant turn"):
        tokenize_sft_dataset(datasets.Dataset.from_list(rows), tok, SFTDataOptions(assistant_only_loss=True))


@pytest.mark.parametrize("completion, why", [([], "empty"),
                                             ([{"role": "user", "content": "more"}], "no assistant message")])
def test_a_completion_without_an_assistant_message_is_refused_by_row(completion, why):
    tok = build_chat_tokenizer("chatml")
    rows = [{"prompt": [USER], "completion": [ANSWER]}, {"prompt": [USER], "completion": completion}]
    with pytest.raises(RowError, match=rf"Example 1 .*'completion' (is|has) {why}") as caught:
        tokenize_sft_dataset(datasets.Dataset.from_list(rows), tok, SFTDataOptions())
    assert "generation prompt" not in str(caught.value)
