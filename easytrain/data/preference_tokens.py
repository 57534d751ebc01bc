"""One preference row -> the prompt's ids and each response's ids and mask, before special tokens and truncation.

Strings follow SFT's rule (``prompt_completion``), per pair: where both ``prompt + chosen`` and ``prompt + rejected``
read the same tokenised apart as whole, the three texts are tokenised apart (the prompt's ids are what generation is
given for it, and the ids are those easytrain gave before joined tokenisation, so older runs' data digests match).
Otherwise (a SentencePiece-style tokenizer, one that prepends '▁' to every text it encodes, reads ``"French:" +
" bonjour"`` apart as ``'▁French:', '▁', '▁bonjour'``, a second space the data never had) both sequences are the
joined texts, each response's tokens found as in SFT (``prompt_completion.completion_tokens``: by character offsets,
a token ending after the prompt is the response's, so one that straddles the boundary is supervised). The prompt is
then the tokens both joined texts share that lie within it; a token past those that still lies within the prompt
(the two texts split the prompt's end differently) stays in its sequence, unsupervised, so a log-ratio never weighs
a prompt-side difference.

Message lists are rendered whole by the chat template (the prompt once more with the generation prompt, which must
be a token prefix of both), so each completion is what follows the rendered prompt.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from transformers import PreTrainedTokenizerBase

from easytrain.data.chat_templates import Message, chat_template_of, drop_none, parse_tools, render_chat
from easytrain.data.errors import DataError
from easytrain.data.message_content import messages_for_template
from easytrain.data.prompt_completion import (common_prefix, completion_tokens, reads_as_joined,
                                              require_prompt_prefix)
from easytrain.data.special_tokens import typed_field
from easytrain.data.text_coder import TextCoder

#: A response's ids and mask (1 on its supervised tokens).
Response = tuple[list[int], list[int]]


def pair_tokens(example: Mapping[str, Any], tokenizer: PreTrainedTokenizerBase,
                chat_template: str | None) -> tuple[list[int], Response, Response]:
    """The prompt ids both sequences start with, then chosen's and rejected's ids and masks.

    Raises:
        DataError: Mixed strings and message lists, or a chat row the template cannot split (see ``_render_pair``).
    """
    if "prompt" not in example:
        tools = parse_tools(example.get("tools"))
        template = chat_template_of(tokenizer, chat_template, tools)
        chosen, rejected = (messages_for_template(typed_field(example, name, list), template, name)
                            for name in ("chosen", "rejected"))
        return _render_pair(*split_implicit_prompt(chosen, rejected), tokenizer, chat_template, example.get("tools"))
    if isinstance(example["prompt"], str):
        if not all(isinstance(example.get(name), str) for name in ("chosen", "rejected")):
            raise DataError(
                f"'prompt' is a string but 'chosen'/'rejected' are "
                f"{type(example.get('chosen')).__name__}/{type(example.get('rejected')).__name__}; "
                "give three strings, or three message lists. For full conversations in "
                "'chosen'/'rejected', drop the 'prompt' column (`dataset.remove_columns('prompt')`)."
            )
        return string_pair_tokens(tokenizer, example["prompt"], example["chosen"], example["rejected"])
    return _render_pair(typed_field(example, "prompt", list), typed_field(example, "chosen", list),
                        typed_field(example, "rejected", list), tokenizer, chat_template, example.get("tools"))


def string_pair_tokens(tokenizer: PreTrainedTokenizerBase, prompt: str, chosen: str,
                       rejected: str) -> tuple[list[int], Response, Response]:
    """The three texts tokenised apart where both sequences read as their joined texts, else ``joined_pair_tokens``."""
    coder = TextCoder(tokenizer)
    prompt_ids, chosen_ids, rejected_ids = coder.encode([prompt, chosen, rejected])
    if all(reads_as_joined(coder, (prompt_ids, ids), prompt + response)
           for ids, response in ((chosen_ids, chosen), (rejected_ids, rejected))):
        return prompt_ids, (chosen_ids, [1] * len(chosen_ids)), (rejected_ids, [1] * len(rejected_ids))
    return joined_pair_tokens(tokenizer, prompt, chosen, rejected)


def joined_pair_tokens(tokenizer: PreTrainedTokenizerBase, prompt: str, chosen: str,
                       rejected: str) -> tuple[list[int], Response, Response]:
    """Tokenise ``prompt + chosen`` and ``prompt + rejected``; the prompt is their shared tokens within it."""
    sides = [completion_tokens(tokenizer, prompt + response, len(prompt)) for response in (chosen, rejected)]
    shared = min(common_prefix(sides[0][0], sides[1][0]), *(_unsupervised_prefix(mask) for _, mask in sides))
    chosen_side, rejected_side = ((ids[shared:], mask[shared:]) for ids, mask in sides)
    return sides[0][0][:shared], chosen_side, rejected_side


def _unsupervised_prefix(mask: Sequence[int]) -> int:
    return next((i for i, bit in enumerate(mask) if bit), len(mask))


def split_implicit_prompt(chosen: Sequence[Message], rejected: Sequence[Message]
                          ) -> tuple[list[Message], list[Message], list[Message]]:
    """``(prompt, chosen_tail, rejected_tail)``: the longest common message prefix and the rest.

    Raises:
        DataError: No common first message, an empty tail (one conversation is a prefix of the
            other), or a tail that does not open with an assistant message.
    """
    a, b = ([drop_none(dict(message)) for message in side] for side in (chosen, rejected))
    shared = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
    if shared == 0:
        raise DataError(
            "'chosen' and 'rejected' share no leading message, so there is no implicit prompt; "
            "start both with the same prompt messages or add a 'prompt' column."
        )
    for name, tail in (("chosen", a[shared:]), ("rejected", b[shared:])):
        if not tail:
            raise DataError(
                f"'{name}' has no messages after the prompt the two conversations share ({shared} "
                "messages), so it has no completion; make each end with a different assistant reply."
            )
        if tail[0].get("role") != "assistant":
            raise DataError(
                f"'{name}' continues the shared prompt with a {tail[0].get('role')!r} message, but a "
                "completion must start with an assistant message; the conversations must first "
                "differ in an assistant reply, or give an explicit 'prompt' column."
            )
    return list(chosen[:shared]), list(chosen[shared:]), list(rejected[shared:])


def _render_pair(prompt: list[Message], chosen: list[Message], rejected: list[Message],
                 tokenizer: PreTrainedTokenizerBase, chat_template: str | None,
                 tools: Any) -> tuple[list[int], Response, Response]:
    """Render the prompt once with the generation prompt; each completion is what follows it.

    Raises:
        DataError: The generation prompt is not a token prefix of a rendered conversation.
    """
    tools = parse_tools(tools)
    template = chat_template_of(tokenizer, chat_template, tools)
    prompt, chosen, rejected = (messages_for_template(messages, template, name) for name, messages in
                                (("prompt", prompt), ("chosen", chosen), ("rejected", rejected)))
    prompt_ids, _ = render_chat(tokenizer, prompt, template=template, tools=tools,
                                add_generation_prompt=True)
    completions = []
    for name, completion in (("chosen", chosen), ("rejected", rejected)):
        ids, _ = render_chat(tokenizer, prompt + completion, template=template, tools=tools)
        require_prompt_prefix(tokenizer, prompt_ids, ids, f"prompt + {name!r}",
                              "so chosen and rejected cannot share the prompt tokens. Fix the template's generation "
                              "prompt or pass `chat_template`.")
        tail = ids[len(prompt_ids):]
        completions.append((tail, [1] * len(tail)))
    return prompt_ids, completions[0], completions[1]
