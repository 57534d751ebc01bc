"""Assistant-only masks come from the template's generation spans and each token's character offsets.

GPT-2-like tokenizers trim whitespace from token offsets (``ByteLevel(trim_offsets=True)``), so a generation
block that starts or ends with a space (Mistral and Llama 2: ``' ' + content + eos``) starts or ends inside no
token's trimmed span. The mask must still be exactly the tokens overlapping a generation span, whatever the
offset trimming; a span that no token covers is refused, naming the row.
"""

import json

import datasets
import pytest
from chat_fixtures import CHAT, MARKED, TOOL_CHAT, WEATHER_TOOL, build_chat_tokenizer
from tokenizers import normalizers, pre_tokenizers, processors
from transformers.utils.chat_template_utils import render_jinja_template

import easytrain.data.assistant_spans as assistant_spans
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


def _reference(tokenizer, messages, tools=None) -> tuple[list[int], str, str]:
    """The rendered chat's ids, and what its supervised and unsupervised tokens must decode to.

    Independent of token offsets: the generation blocks' characters, joined, and the rest of the text. Every
    block of these templates starts and ends at a token boundary, so exactly its tokens are supervised.
    """
    rendered, spans = render_jinja_template(
        conversations=[messages], tools=tools, chat_template=tokenizer.chat_template,
        return_assistant_tokens_mask=True, **tokenizer.special_tokens_map)
    text, inside = rendered[0], [False] * len(rendered[0])
    for start, end in spans[0]:
        inside[start:end] = [True] * (end - start)
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return (ids, "".join(c for c, bit in zip(text, inside, strict=True) if bit),
            "".join(c for c, bit in zip(text, inside, strict=True) if not bit))


class _PythonSplit:
    """A pre-tokenizer written in Python (as RoFormer's jieba one is): its backend cannot be serialized."""

    def pre_tokenize(self, pretok) -> None:
        pretok.split(lambda _, piece: [piece])


def _with_python_pre_tokenizer(tokenizer):
    """``tokenizer`` tokenising as before, through a pre-tokenizer that cannot be serialized."""
    backend = tokenizer.backend_tokenizer
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.PreTokenizer.custom(_PythonSplit()), backend.pre_tokenizer])
    return tokenizer


def _supervised(tokenizer, ids, mask) -> str:
    return tokenizer.decode([token for token, bit in zip(ids, mask, strict=True) if bit])


@pytest.mark.parametrize("backend", ["serializable", "python_pre_tokenizer"])
@pytest.mark.parametrize("trim_offsets", [None, False, True])
@pytest.mark.parametrize("name", MARKED)
@pytest.mark.parametrize("chat", ["plain", "tools"])
def test_mask_matches_the_generation_spans_with_any_offset_trimming(name, trim_offsets, chat, backend):
    tokenizer = _tokenizer(name, trim_offsets)
    if backend == "python_pre_tokenizer":
        _with_python_pre_tokenizer(tokenizer)
    messages, tools = (CHAT, None) if chat == "plain" else (TOOL_CHAT, [WEATHER_TOOL])
    row = {"messages": messages} if tools is None else {"messages": messages, "tools": json.dumps(tools)}
    example = tokenize_example(row, tokenizer, OPTIONS, CONVERSATIONAL)
    ids, supervised, rest = _reference(tokenizer, messages, tools)
    assert example.input_ids[: len(ids)] == ids  # the rendered chat, then the EOS tokenize_example may add
    mask = example.loss_mask[: len(ids)]
    assert mask[0] == 0 and sum(mask) > 0
    assert _supervised(tokenizer, ids, mask) == supervised
    assert _supervised(tokenizer, ids, [1 - bit for bit in mask]) == rest


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


def test_python_pre_tokenizer_with_trimmed_offsets_keeps_a_leading_space_block():
    tokenizer = _with_python_pre_tokenizer(_tokenizer("mistral", True, LEADING_SPACE))
    example = tokenize_example({"messages": SHORT}, tokenizer, OPTIONS, CONVERSATIONAL)
    assert _supervised(tokenizer, example.input_ids, example.loss_mask) == " four</s> Bye</s>"


def test_python_pre_tokenizer_with_trimmed_offsets_refuses_a_wrong_mask_naming_the_row():
    tokenizer = _with_python_pre_tokenizer(_tokenizer("chatml", True, TRAILING_SPACE))
    rows = datasets.Dataset.from_list([{"messages": SHORT[:3]}])
    with pytest.raises(DataError) as info:  # the trimmed ' ' before <|endoftext|> would not be trained
        tokenize_sft_dataset(rows, tokenizer, OPTIONS)
    text = str(info.value)
    assert "Example 0 (0-based row index)" in text and "trim_offsets" in text and "cannot be serialized" in text, text


def _copy_with(monkeypatch, change):
    """Make the untrimmed copy of the backend differ as a tokenizer.json's settings can make it differ."""
    serialised = assistant_spans._serialised_copy

    def copy_then_change(backend):
        copied = serialised(backend)
        change(copied)
        return copied
    monkeypatch.setattr(assistant_spans, "_serialised_copy", copy_then_change)


@pytest.mark.parametrize("setting", ["truncation", "padding"])
def test_truncation_or_padding_in_the_backend_does_not_bring_back_trimmed_offsets(monkeypatch, setting):
    def change(backend):
        if setting == "truncation":
            backend.enable_truncation(max_length=3)
        else:
            backend.enable_padding(length=512, pad_id=0)
    _copy_with(monkeypatch, change)
    tokenizer = _tokenizer("chatml", True, TRAILING_SPACE)
    example = tokenize_example({"messages": SHORT[:3]}, tokenizer, OPTIONS, CONVERSATIONAL)
    assert _supervised(tokenizer, example.input_ids, example.loss_mask) == "four "


def test_a_copy_that_tokenises_differently_is_an_error_not_a_silent_fallback(monkeypatch):
    def change(backend):
        backend.normalizer = normalizers.Replace("o", "0")
    _copy_with(monkeypatch, change)
    tokenizer = _tokenizer("chatml", True, TRAILING_SPACE)
    with pytest.raises(DataError, match="trim_offsets"):
        tokenize_example({"messages": SHORT[:3]}, tokenizer, OPTIONS, CONVERSATIONAL)


@pytest.mark.parametrize(("post_processor", "copies"), [
    (None, 0), (processors.ByteLevel(trim_offsets=False), 0), (processors.ByteLevel(trim_offsets=True), 1),
    (processors.RobertaProcessing(("</s>", 2), ("<s>", 1), trim_offsets=True), 1),
    (processors.RobertaProcessing(("</s>", 2), ("<s>", 1), trim_offsets=False), 0),
    (processors.Sequence([processors.ByteLevel(trim_offsets=True), processors.TemplateProcessing(single="$A")]), 1),
    (processors.TemplateProcessing(single="$A"), 0),
])
def test_a_second_encoding_only_when_the_post_processor_trims_offsets(monkeypatch, post_processor, copies):
    made = []
    serialised = assistant_spans._serialised_copy
    monkeypatch.setattr(assistant_spans, "_serialised_copy", lambda backend: made.append(1) or serialised(backend))
    tokenizer = _tokenizer("mistral", None, LEADING_SPACE)
    tokenizer.backend_tokenizer.post_processor = post_processor
    for _ in range(2):
        example = tokenize_example({"messages": SHORT}, tokenizer, OPTIONS, CONVERSATIONAL)
        assert _supervised(tokenizer, example.input_ids, example.loss_mask) == " four</s> Bye</s>"
    assert len(made) == copies


def test_a_token_straddling_a_span_boundary_is_supervised_and_one_touching_it_is_not():
    # " Two" (7-11) starts before the block (8-20) and ends inside it: it overlaps, so it is trained
    text = "[/INST] Two plus two"
    offsets = [(0, 7), (7, 11), (11, 16), (16, 20)]
    assert assistant_spans.mask_from_spans(offsets, [(8, 20)], text) == [0, 1, 1, 1]
    assert assistant_spans.mask_from_spans(offsets, [(7, 13)], text) == [0, 1, 1, 0]  # (11-16) straddles the end
    assert assistant_spans.mask_from_spans([(0, 7), (7, 7), (7, 11)], [(7, 11)], text) == [0, 1, 1]  # zero-width
