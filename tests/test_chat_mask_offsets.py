"""Assistant-only masks come from the template's generation spans and each token's character offsets.

GPT-2-like tokenizers trim whitespace from token offsets (``ByteLevel(trim_offsets=True)``), so a generation
block that starts or ends with a space (Mistral and Llama 2: ``' ' + content + eos``) starts or ends inside no
token's trimmed span. The mask must still be exactly the tokens overlapping a generation span, whatever the
offset trimming; a span that no token covers is refused, naming the row.
"""

import copy
import json

import datasets
import pytest
from chat_fixtures import CHAT, MARKED, TOOL_CHAT, WEATHER_TOOL, build_chat_tokenizer
from tokenizers import normalizers, processors
from transformers.utils.chat_template_utils import render_jinja_template

from easytrain.data import DataError
from easytrain.data.sft import CONVERSATIONAL, SFTDataOptions, tokenize_example, tokenize_sft_dataset

OPTIONS = SFTDataOptions(assistant_only_loss=True, max_length=None)
# Llama 2 style: the block ends with a space, the end-of-sequence token follows it (ChatML tokens stand in).
TRAILING_SPACE = (
    "{% for m in messages %}{% if m.role == 'user' %}{{ '<|im_start|>' + m.content + '<|im_end|>' }}"
    "{% else %}{% generation %}{{ m.content + ' ' }}{% endgeneration %}{{ '<|endoftext|>' }}"
    "{% endif %}{% endfor %}"
)
# Mistral / Llama 2 style: the block starts with a space.
LEADING_SPACE = (
    "{{ bos_token }}{% for message in messages %}{% if message.role == 'user' %}"
    "{{ '[INST] ' + message.content + ' [/INST]' }}"
    "{% else %}{% generation %}{{ ' ' + message.content + eos_token }}{% endgeneration %}{% endif %}{% endfor %}"
)
SHORT = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "four"},
         {"role": "user", "content": "Thank you, goodbye!"}, {"role": "assistant", "content": "Bye"}]


def _tokenizer(name: str, trim_offsets: bool | None, template: str | None = None):
    tokenizer = build_chat_tokenizer(name)
    if trim_offsets is not None:
        tokenizer.backend_tokenizer.post_processor = processors.ByteLevel(trim_offsets=trim_offsets)
    if template is not None:
        tokenizer.chat_template = template
    return tokenizer


def _reference(tokenizer, messages, tools=None) -> tuple[list[int], list[int]]:
    """Tokens whose untrimmed offsets overlap a generation span (zero-width: lie inside one)."""
    rendered, spans = render_jinja_template(
        conversations=[messages], tools=tools, chat_template=tokenizer.chat_template,
        return_assistant_tokens_mask=True, **tokenizer.special_tokens_map)
    raw = copy.deepcopy(tokenizer.backend_tokenizer)
    raw.post_processor = None
    encoding = raw.encode(rendered[0], add_special_tokens=False)
    mask = [int(any(s < b and a < e if s < e else a <= s < b for a, b in spans[0])) for s, e in encoding.offsets]
    return encoding.ids, mask


def _supervised(tokenizer, ids, mask) -> str:
    return tokenizer.decode([token for token, bit in zip(ids, mask, strict=True) if bit])


@pytest.mark.parametrize("trim_offsets", [None, False, True])
@pytest.mark.parametrize("name", MARKED)
@pytest.mark.parametrize("chat", ["plain", "tools"])
def test_mask_matches_the_generation_spans_with_any_offset_trimming(name, trim_offsets, chat):
    tokenizer = _tokenizer(name, trim_offsets)
    messages, tools = (CHAT, None) if chat == "plain" else (TOOL_CHAT, [WEATHER_TOOL])
    row = {"messages": messages} if tools is None else {"messages": messages, "tools": json.dumps(tools)}
    example = tokenize_example(row, tokenizer, OPTIONS, CONVERSATIONAL)
    ids, mask = _reference(tokenizer, messages, tools)
    mask[0] = 0  # token 0 is never supervised
    assert example.input_ids[: len(ids)] == ids
    got = example.loss_mask[: len(ids)]
    assert got == mask, (_supervised(tokenizer, ids, got), _supervised(tokenizer, ids, mask))
    assert sum(got) > 0


@pytest.mark.parametrize("trim_offsets", [None, True])
def test_block_starting_with_a_space_keeps_every_turn(trim_offsets):
    tokenizer = _tokenizer("mistral", trim_offsets, LEADING_SPACE)
    example = tokenize_example({"messages": SHORT}, tokenizer, OPTIONS, CONVERSATIONAL)
    assert _supervised(tokenizer, example.input_ids, example.loss_mask) == " four</s> Bye</s>"


@pytest.mark.parametrize("trim_offsets", [None, True])
def test_block_ending_with_a_space_does_not_train_the_user_turn(trim_offsets):
    tokenizer = _tokenizer("chatml", trim_offsets, TRAILING_SPACE)
    example = tokenize_example({"messages": SHORT[:3]}, tokenizer, OPTIONS, CONVERSATIONAL)
    assert _supervised(tokenizer, example.input_ids, example.loss_mask) == "four "


def test_tool_call_turn_is_not_lost_with_trimmed_offsets():
    tokenizer = _tokenizer("mistral", True)
    rows = datasets.Dataset.from_list([{"messages": TOOL_CHAT, "tools": json.dumps([WEATHER_TOOL])}])
    tokenized, stats = tokenize_sft_dataset(rows, tokenizer, OPTIONS)
    text = _supervised(tokenizer, tokenized[0]["input_ids"], tokenized[0]["loss_mask"])
    assert text.endswith("</s> The weather in Paris is sunny and warm.</s>"), text
    assert text.startswith("[TOOL_CALLS]"), text


def test_generation_span_without_a_token_is_refused_naming_the_row():
    tokenizer = _tokenizer("chatml", None)
    tokenizer.backend_tokenizer.normalizer = normalizers.Replace("§", "")  # the normaliser deletes '§'
    good = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "four"}]}
    bad = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "§§"}]}
    split = tokenizer.chat_template.replace("{% endif %}{{ '<|im_end|>' }}",  # content and end of turn apart
                                            "{% endif %}{% endgeneration %}{% generation %}{{ '<|im_end|>' }}")
    assert split != tokenizer.chat_template
    tokenizer.chat_template = split
    with pytest.raises(DataError) as info:
        tokenize_sft_dataset(datasets.Dataset.from_list([good, good, bad]), tokenizer, OPTIONS)
    text = str(info.value)
    assert "Example 2 (0-based row index)" in text, text
    assert "generation" in text and "'§§'" in text, text
