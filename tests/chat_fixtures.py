"""Small local chat tokenizers with hand-written templates, one per template family.

Each tokenizer is a byte-level BPE trained in milliseconds on a few KB of local text (no
network), wrapped as a ``PreTrainedTokenizerFast``. Templates put ``{% generation %}`` around
each assistant turn's content *and* its end-of-turn token, so the model is taught to stop.
Newlines after block tags are written as ``{{ '\\n' }}`` because transformers renders with
``trim_blocks=True``, which eats a literal newline right after a tag.

``build_chat_tokenizer(name)`` is cached: callers must not mutate what it returns (copy first).
"""

from __future__ import annotations

import copy
import functools
from dataclasses import dataclass

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

_TEXT = (
    "The quick brown fox jumps over the lazy dog. A journey of a thousand miles begins with one step. "
    "All that glitters is not gold. Where there is a will there is a way. Practice makes perfect. "
    "What is two plus two? Two plus two is four. Please call the weather tool for Paris. "
    "The weather in Paris is sunny and warm. You are a helpful assistant. Thank you, goodbye! "
    "Translate hello into French: bonjour. Write a haiku about the sea, the moon and the tide. "
) * 8

LLAMA3 = (
    "{{ bos_token }}"
    "{% if tools %}{{ '<|start_header_id|>system<|end_header_id|>\\n\\nTools:' }}"
    "{% for tool in tools %}{{ '\\n' + (tool | tojson) }}{% endfor %}{{ '<|eot_id|>' }}{% endif %}"
    "{% for message in messages %}"
    "{% if message.role == 'assistant' %}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}"
    "{% generation %}"
    "{% if message.tool_calls %}{% for call in message.tool_calls %}{{ call.function | tojson }}{% endfor %}"
    "{% else %}{{ message.content }}{% endif %}{{ '<|eot_id|>' }}"
    "{% endgeneration %}"
    "{% else %}"
    "{{ '<|start_header_id|>' + ('ipython' if message.role == 'tool' else message.role) }}"
    "{{ '<|end_header_id|>\\n\\n' + message.content + '<|eot_id|>' }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"
)

CHATML = (
    "{% if tools %}{{ '<|im_start|>system\\nTools:' }}"
    "{% for tool in tools %}{{ '\\n' + (tool | tojson) }}{% endfor %}{{ '<|im_end|>\\n' }}{% endif %}"
    "{% for message in messages %}"
    "{% if message.role == 'assistant' %}"
    "{{ '<|im_start|>assistant\\n' }}"
    "{% generation %}"
    "{% if message.tool_calls %}{% for call in message.tool_calls %}"
    "{{ '<tool_call>' + (call.function | tojson) + '</tool_call>' }}{% endfor %}"
    "{% else %}{{ message.content }}{% endif %}{{ '<|im_end|>' }}"
    "{% endgeneration %}{{ '\\n' }}"
    "{% else %}{{ '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>\\n' }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

# Mistral has no system role: the system text opens the first user turn.
MISTRAL = (
    "{{ bos_token }}"
    "{% set ns = namespace(system='') %}"
    "{% if tools %}{{ '[AVAILABLE_TOOLS] ' + (tools | tojson) + '[/AVAILABLE_TOOLS]' }}{% endif %}"
    "{% for message in messages %}"
    "{% if message.role == 'system' %}{% set ns.system = message.content + '\\n\\n' %}"
    "{% elif message.role == 'user' %}{{ '[INST] ' + ns.system + message.content + ' [/INST]' }}"
    "{% set ns.system = '' %}"
    "{% elif message.role == 'tool' %}{{ '[TOOL_RESULTS] ' + message.content + '[/TOOL_RESULTS]' }}"
    "{% else %}"
    "{% generation %}"
    "{% if message.tool_calls %}"
    "{{ '[TOOL_CALLS] ' + (message.tool_calls | map(attribute='function') | list | tojson) }}"
    "{% else %}{{ ' ' + message.content }}{% endif %}{{ eos_token }}"
    "{% endgeneration %}"
    "{% endif %}"
    "{% endfor %}"
)

GEMMA = (
    "{{ bos_token }}"
    "{% if tools %}{{ '<start_of_turn>system\\nTools:' }}"
    "{% for tool in tools %}{{ '\\n' + (tool | tojson) }}{% endfor %}{{ '<end_of_turn>\\n' }}{% endif %}"
    "{% for message in messages %}"
    "{% if message.role == 'assistant' %}"
    "{{ '<start_of_turn>model\\n' }}"
    "{% generation %}"
    "{% if message.tool_calls %}{% for call in message.tool_calls %}{{ call.function | tojson }}{% endfor %}"
    "{% else %}{{ message.content }}{% endif %}{{ '<end_of_turn>' }}"
    "{% endgeneration %}{{ '\\n' }}"
    "{% else %}{{ '<start_of_turn>' + message.role + '\\n' + message.content + '<end_of_turn>\\n' }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<start_of_turn>model\\n' }}{% endif %}"
)

# Zephyr-like and WITHOUT generation markers: assistant_only_loss must refuse it.
NO_MARKERS = (
    "{% for message in messages %}{{ '<|' + message.role + '|>\\n' + message.content + eos_token + '\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}"
)


@dataclass(frozen=True)
class ChatSpec:
    """How to build one test tokenizer and what its assistant spans must decode to."""

    template: str
    special_tokens: tuple[str, ...]
    bos: str | None
    eos: str
    pad: str
    end_of_turn: str  # what closes an assistant turn inside the generation block
    content_prefix: str = ""  # text the template puts before the content inside the block


SPECS: dict[str, ChatSpec] = {
    "llama3": ChatSpec(
        LLAMA3,
        ("<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>",
         "<|eot_id|>", "<|finetune_right_pad_id|>"),
        bos="<|begin_of_text|>", eos="<|eot_id|>", pad="<|finetune_right_pad_id|>",
        end_of_turn="<|eot_id|>",
    ),
    # The base Llama-3 tokenizer: EOS is <|end_of_text|>, not the end of turn, and pad == eos.
    "llama3_base": ChatSpec(
        LLAMA3,
        ("<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>",
         "<|eot_id|>", "<|finetune_right_pad_id|>"),
        bos="<|begin_of_text|>", eos="<|end_of_text|>", pad="<|end_of_text|>",
        end_of_turn="<|eot_id|>",
    ),
    "chatml": ChatSpec(
        CHATML, ("<|endoftext|>", "<|im_start|>", "<|im_end|>"),
        bos=None, eos="<|im_end|>", pad="<|endoftext|>", end_of_turn="<|im_end|>",
    ),
    "mistral": ChatSpec(
        MISTRAL,
        ("<unk>", "<s>", "</s>", "[INST]", "[/INST]", "[TOOL_CALLS]", "[AVAILABLE_TOOLS]",
         "[/AVAILABLE_TOOLS]", "[TOOL_RESULTS]", "[/TOOL_RESULTS]"),
        bos="<s>", eos="</s>", pad="</s>", end_of_turn="</s>", content_prefix=" ",
    ),
    "gemma": ChatSpec(
        GEMMA, ("<pad>", "<eos>", "<bos>", "<start_of_turn>", "<end_of_turn>"),
        bos="<bos>", eos="<end_of_turn>", pad="<pad>", end_of_turn="<end_of_turn>",
    ),
    "no_markers": ChatSpec(
        NO_MARKERS, ("<s>", "</s>", "<|system|>", "<|user|>", "<|assistant|>", "<|tool|>"),
        bos="<s>", eos="</s>", pad="</s>", end_of_turn="</s>",
    ),
}

#: The templates with generation markers: every assistant-mask test runs over all of them.
MARKED = ("llama3", "llama3_base", "chatml", "mistral", "gemma")


@functools.cache
def _cached_tokenizer(name: str) -> PreTrainedTokenizerFast:
    spec = SPECS[name]
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=list(spec.special_tokens),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    bpe.train_from_iterator([_TEXT[i : i + 200] for i in range(0, len(_TEXT), 200)], trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=bpe, bos_token=spec.bos, eos_token=spec.eos, pad_token=spec.pad,
        chat_template=spec.template, clean_up_tokenization_spaces=False,
    )


def build_chat_tokenizer(name: str) -> PreTrainedTokenizerFast:
    """A fresh copy of the cached tokenizer ``name`` (see ``SPECS``), safe to modify."""
    return copy.deepcopy(_cached_tokenizer(name))


def assistant_span(name: str, content: str) -> str:
    """What the supervised tokens of one assistant turn with ``content`` must decode to."""
    spec = SPECS[name]
    return spec.content_prefix + content + spec.end_of_turn


WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Weather in a city.",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}

CHAT = [
    {"role": "system", "content": "You are a helpful assistant."},
    {"role": "user", "content": "What is two plus two?"},
    {"role": "assistant", "content": "Two plus two is four."},
    {"role": "user", "content": "Thank you!"},
    {"role": "assistant", "content": "You are welcome, goodbye!"},
]

TOOL_CHAT = [
    {"role": "user", "content": "Please call the weather tool for Paris."},
    {"role": "assistant", "content": "",
     "tool_calls": [{"type": "function",
                     "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]},
    {"role": "tool", "content": "sunny and warm"},
    {"role": "assistant", "content": "The weather in Paris is sunny and warm."},
]

#: A Mistral-style template that refuses two user turns in a row (its `raise_exception` message is `ALTERNATE`),
#: and the two turns the tests build conversations from.
ALTERNATE = "Conversation roles must alternate user/assistant/user/assistant/..."
STRICT = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('" + ALTERNATE + "') }}{% endif %}"
    "{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
    "{% else %}{% generation %}{{ ' ' + message['content'] + eos_token }}{% endgeneration %}{% endif %}"
    "{% endfor %}"
)
USER, ANSWER = {"role": "user", "content": "What is two plus two?"}, {"role": "assistant", "content": "four"}
