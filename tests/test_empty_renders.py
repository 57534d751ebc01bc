"""A conversation the template renders to special tokens only is dropped and counted, not trained as "stop at once".

A template leaves out every role it does not render, so ShareGPT's ``human``/``gpt`` roles under a template that
renders ``user``/``assistant`` give ``[BOS]``; the appended EOS would then be a supervised example of stopping.
"""

import datasets
import pytest

from easytrain.data import DataError
from easytrain.data.sft import SFTDataOptions, tokenize_example, tokenize_sft_dataset
from easytrain.tasks.arithmetic import build_arithmetic_chat_tokenizer

SHAREGPT = {"messages": [{"role": "human", "content": "2+2"}, {"role": "gpt", "content": "4"}]}
GOOD = {"messages": [{"role": "user", "content": "2+2"}, {"role": "assistant", "content": "4"}]}
SYSTEM_ONLY = {"messages": [{"role": "system", "content": "Be brief."}]}


@pytest.fixture(scope="module")
def tokenizer():
    return build_arithmetic_chat_tokenizer()  # renders user and assistant turns only


def test_a_row_rendered_to_special_tokens_only_has_no_tokens(tokenizer):
    out = tokenize_example(SHAREGPT, tokenizer, SFTDataOptions(max_length=64), "conversational")
    assert out.input_ids == [] and out.loss_mask == [], tokenizer.decode(out.input_ids)


def test_such_rows_are_dropped_and_counted_like_empty_text(tokenizer):
    tokenized, stats = tokenize_sft_dataset(datasets.Dataset.from_list([GOOD, SHAREGPT, GOOD, SYSTEM_ONLY]),
                                            tokenizer, SFTDataOptions(max_length=64))
    assert stats["num_kept"] == 2 and stats["dropped_no_supervised_tokens"] == 2, stats
    assert len(tokenized) == 2


def test_when_every_row_renders_empty_the_error_names_the_skipped_roles(tokenizer):
    with pytest.raises(DataError) as info:
        tokenize_sft_dataset(datasets.Dataset.from_list([SHAREGPT] * 3), tokenizer, SFTDataOptions(max_length=64))
    text = str(info.value)
    assert "'human'" in text and "'gpt'" in text and "ShareGPT" in text, text
    assert "'user'" in text and "'assistant'" in text, text


def test_an_all_empty_text_dataset_does_not_speak_of_roles(tokenizer):
    with pytest.raises(DataError) as info:
        tokenize_sft_dataset(datasets.Dataset.from_list([{"text": ""}, {"text": "  "}]), tokenizer,
                             SFTDataOptions(max_length=64))
    assert "role" not in str(info.value), str(info.value)
