"""Prompt-completion examples -> ids and the mask of the completion's tokens (before BOS/EOS and truncation).

Strings are tokenised APART, prompt and completion each alone, wherever that reads as the joined text: where
``decode(prompt_ids + completion_ids) == decode(joined_ids)`` (one decode, without its clean-up, so a decoder's quirks
cancel out). The prompt's ids are then exactly what generation is given for that prompt (byte-level BPE keeps a trailing
space as the prompt's 'Ġ'), and the ids are those easytrain gave before joined tokenisation existed, so older runs' data
digests match. A byte-level BPE that adds nothing is known to read so without tokenising the joined text
(``text_coder``): the same ids in less time. Only where apart is not faithful (a SentencePiece-style tokenizer prepends
'▁' to every text it encodes, as Llama's legacy converter and Metaspace ``prepend_scheme="first"``/``"always"`` do, so
``"French:" + " bonjour"`` reads ``'French:  bonjour'``) are the joined text's ids used. The completion's tokens are
then found from each token's character offsets: a token is the completion's if it ends after the prompt's last
character, so a token that holds both the prompt's end and the completion's start (e.g. ``'▁four'`` of ``"two? " +
"four"``) is supervised, since the model has to produce it. A tokenizer without offsets (a slow one), or whose offsets
stay trimmed, finds the same boundary from ids: the completion starts at the first token of the joined text that differs
from the prompt's own tokenisation. Either way the ids before the completion's first token are the prompt generation is
asked with (``prompts``).

Message lists are rendered by the chat template twice, the prompt with the generation prompt and the whole; the
first must be a token prefix of the second.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from transformers import PreTrainedTokenizerBase

from easytrain.data.assistant_spans import encode_with_offsets
from easytrain.data.chat_templates import chat_template_of, parse_tools, render_chat, require_generation_markers
from easytrain.data.errors import DataError
from easytrain.data.message_content import messages_for_template
from easytrain.data.special_tokens import encode_text, last_content_index, typed_field
from easytrain.data.text_coder import TextCoder

if TYPE_CHECKING:
    from easytrain.data.sft import SFTDataOptions


def render_prompt_completion_text(example: Mapping[str, Any], tokenizer: PreTrainedTokenizerBase,
                                  options: SFTDataOptions) -> tuple[list[int], list[int], bool]:
    """The row's ids (``prompt_completion_tokens``), its mask (the completion's tokens; every token without
    `completion_only_loss`), and True: an appended EOS ends the completion, so it is supervised."""
    prompt, completion = (typed_field(example, name, str) for name in ("prompt", "completion"))
    ids, mask = prompt_completion_tokens(tokenizer, prompt, completion)
    return ids, mask if options.completion_only_loss else [1] * len(ids), True


def prompt_completion_tokens(tokenizer: PreTrainedTokenizerBase, prompt: str,
                             completion: str) -> tuple[list[int], list[int]]:
    """The ids of ``prompt + completion`` and 1 on the completion's tokens: the two tokenised apart where that reads
    as the joined text (``reads_as_joined``), else the joined text's (``completion_tokens``)."""
    coder = TextCoder(tokenizer)
    apart = coder.encode([prompt, completion])
    if reads_as_joined(coder, apart, prompt + completion):
        return apart[0] + apart[1], [0] * len(apart[0]) + [1] * len(apart[1])
    return completion_tokens(tokenizer, prompt + completion, len(prompt))


def reads_as_joined(coder: TextCoder, pieces: Sequence[Sequence[int]], text: str) -> bool:
    """Whether ``pieces`` (the parts of ``text`` tokenised apart), put together, read as ``text`` tokenised whole:
    the same ids, or ids that decode to the same string (decoded alike, so a decoder that strips a leading space
    treats both alike; without `clean_up_tokenization_spaces`, which would read 'two ?' as 'two?'). A byte-level BPE
    that adds nothing always reads so (``TextCoder.joins_losslessly``): that answer, without comparing."""
    if coder.joins_losslessly(text):
        return True
    ids = [token for piece in pieces for token in piece]
    [joined] = coder.encode([text])
    return ids == joined or coder.decode(ids) == coder.decode(joined)


def completion_tokens(tokenizer: PreTrainedTokenizerBase, text: str, boundary: int) -> tuple[list[int], list[int]]:
    """``text``'s ids and 1 for each token of ``text[boundary:]``: one ending after ``boundary`` (a zero-width one:
    at or after it), from offsets; without untrimmed offsets, from where the ids part from the prompt's own."""
    try:
        ids, offsets, trimmed_because = encode_with_offsets(tokenizer, text)
    except NotImplementedError:  # a slow tokenizer
        ids, offsets, trimmed_because = encode_text(tokenizer, text), [], "no offsets"
    if trimmed_because is None:
        return ids, [int(end > boundary or start == end >= boundary) for start, end in offsets]
    prompt_ids = encode_text(tokenizer, text[:boundary])
    start = common_prefix(prompt_ids, ids)
    return ids, [0] * start + [1] * (len(ids) - start)


def require_prompt_prefix(tokenizer: PreTrainedTokenizerBase, prompt_ids: Sequence[int], ids: Sequence[int],
                          rendering: str, consequence: str) -> None:
    """Refuse a conversation whose rendering (`ids`) does not start with its prompt rendered with the generation
    prompt (`prompt_ids`): where the completion starts would be unknown. The error shows where the two part.

    Raises:
        DataError: Not a prefix; names `rendering` and what follows from it (`consequence`, with the fix).
    """
    if list(ids[: len(prompt_ids)]) != list(prompt_ids):
        differ = common_prefix(prompt_ids, ids)
        raise DataError(f"The prompt rendered with `add_generation_prompt=True` is not a token prefix of {rendering} "
                        f"(they differ from token {differ}: {tokenizer.decode(prompt_ids[differ:differ + 8])!r} vs "
                        f"{tokenizer.decode(ids[differ:differ + 8])!r}), {consequence}")


def common_prefix(first: Sequence[int], second: Sequence[int]) -> int:
    """How many leading ids the two lists share."""
    return next((i for i, (a, b) in enumerate(zip(first, second)) if a != b), min(len(first), len(second)))


def render_prompt_completion_messages(
    example: Mapping[str, Any], tokenizer: PreTrainedTokenizerBase, options: SFTDataOptions
) -> tuple[list[int], list[int], bool]:
    """The prompt rendered with the generation prompt must be a token prefix of the whole.

    Raises:
        DataError: The row's template (a named one, picked by its tools) has no generation markers under
            `assistant_only_loss`, the completion has no assistant message, or the prefix does not hold.
    """
    tools = parse_tools(example.get("tools"))
    template = chat_template_of(tokenizer, options.chat_template, tools)
    if options.assistant_only_loss:
        require_generation_markers(template)
    prompt_messages = messages_for_template(typed_field(example, "prompt", list), template, "prompt")
    completion = messages_for_template(typed_field(example, "completion", list), template, "completion")
    _require_assistant_message(completion)
    messages = prompt_messages + completion
    prompt_ids, _ = render_chat(tokenizer, prompt_messages, template=template, tools=tools,
                                add_generation_prompt=True)
    ids, assistant_mask = render_chat(tokenizer, messages, template=template, tools=tools,
                                      assistant_mask=options.assistant_only_loss)
    require_prompt_prefix(tokenizer, prompt_ids, ids, "the prompt + completion rendering",
                          "so the completion boundary is unknown. Fix the chat template's generation prompt, or put "
                          "the whole conversation in a 'messages' column and use `assistant_only_loss=True`.")
    prompt_bit = 0 if options.completion_only_loss else 1
    mask = [prompt_bit] * len(prompt_ids) + [1] * (len(ids) - len(prompt_ids))
    if assistant_mask is not None:
        mask = [a & b for a, b in zip(mask, assistant_mask, strict=True)]
    return ids, mask, last_content_supervised(ids, mask, tokenizer)


def _require_assistant_message(completion: Sequence[Mapping[str, Any]]) -> None:
    """A completion is what the model answers: one without an assistant message has nothing to train on (and
    would fail the prefix check with an error blaming the template). Messages without a 'role' key (ShareGPT's
    'from') are left to the template."""
    if not completion:
        raise DataError("Field 'completion' is empty: a prompt-completion row needs the assistant's answer "
                        "(e.g. [{'role': 'assistant', 'content': ...}]); fix the row or drop it.")
    roles = [message.get("role") for message in completion]
    if None not in roles and "assistant" not in roles:
        raise DataError(f"Field 'completion' has no assistant message (roles {roles}): a prompt-completion row's "
                        "completion is the assistant's answer; move the other messages into 'prompt', or fix the "
                        "row or drop it.")


def last_content_supervised(ids: Sequence[int], mask: Sequence[int], tokenizer: PreTrainedTokenizerBase) -> bool:
    """An EOS appended to a chat is supervised only if the turn it closes is."""
    last = last_content_index(ids, tokenizer)
    return last is not None and bool(mask[last])

