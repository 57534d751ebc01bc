"""Generation-eval prompts are the prompt part of the ids training sees: a token prefix of them, BOS included, with
tools rendered as training rendered them (a prompt that drifts from training's ids scores a model on text it never
saw)."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import pytest
from chat_fixtures import CHAT, SPECS, TOOL_CHAT, WEATHER_TOOL, build_chat_tokenizer

from easytrain.data.prompts import prompt_and_reference
from easytrain.data.sft import SFTDataOptions, tokenize_example


@pytest.fixture(scope="module")
def toks():
    return {name: build_chat_tokenizer(name) for name in SPECS}


def test_generation_prompts_render_tools_as_training_did():
    tokenizer = build_chat_tokenizer("llama3")
    example = {"messages": TOOL_CHAT, "tools": [WEATHER_TOOL]}
    prompt, reference = prompt_and_reference(example, tokenizer, "conversational")
    full = tokenize_example(example, tokenizer, SFTDataOptions(max_length=None), "conversational").input_ids
    assert full[: len(prompt)] == prompt and reference == TOOL_CHAT[-1]["content"]


def generation_examples(name):
    """Every format with a prompt, and prompt strings that already start with the BOS text."""
    bos = SPECS[name].bos or ""
    return [({"messages": CHAT}, "conversational"),
            ({"messages": TOOL_CHAT, "tools": [WEATHER_TOOL]}, "conversational"),
            ({"prompt": CHAT[:2], "completion": CHAT[2:3]}, "prompt_completion"),
            ({"prompt": "What is two plus two?", "completion": " Four."}, "prompt_completion"),
            ({"prompt": bos + "What is two plus two?", "completion": " Four."}, "prompt_completion"),
            ({"prompt": bos + bos + "What is two plus two?", "completion": " Four."}, "prompt_completion")]


@pytest.mark.parametrize("name", sorted(SPECS))
def test_generation_prompts_are_a_token_prefix_of_the_training_ids(toks, name):
    """BOS included: a template without `{{ bos_token }}` or a prompt string holding the BOS text."""
    tok = toks[name]
    for example, data_format in generation_examples(name):
        prompt, _ = prompt_and_reference(example, tok, data_format)
        full = tokenize_example(example, tok, SFTDataOptions(max_length=None), data_format).input_ids
        assert 0 < len(prompt) < len(full) and full[: len(prompt)] == prompt, (
            data_format, tok.convert_ids_to_tokens(prompt[:4]), tok.convert_ids_to_tokens(full[:4]))
