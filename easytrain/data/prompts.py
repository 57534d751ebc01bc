"""Prompts and reference answers of supervised examples, for evaluation by generation.

The prompt is tokenised the way training tokenised it (the chat template with its generation prompt,
or BOS + the prompt text), so the model is asked exactly what it learned to answer.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from transformers import PreTrainedTokenizerBase

from easytrain.data.chat_templates import chat_template_of, drop_none, parse_tools, render_chat
from easytrain.data.errors import DataError
from easytrain.data.sft import CONVERSATIONAL, PROMPT_COMPLETION, detect_format


def prompt_and_reference(example: Mapping[str, Any], tokenizer: PreTrainedTokenizerBase,
                         data_format: str) -> tuple[list[int], str]:
    """`(prompt token ids, reference answer)` of one conversational or prompt-completion example.

    A conversation's reference is its last message, which must be the assistant's.
    """
    if data_format == CONVERSATIONAL:
        messages = [drop_none(dict(m)) for m in example["messages"]]
        if not messages or messages[-1].get("role") != "assistant":
            raise DataError("evaluation by generation needs conversations that end with an assistant message.")
        return _chat_prompt(messages[:-1], tokenizer, example.get("tools")), str(messages[-1]["content"])
    if data_format == PROMPT_COMPLETION:
        prompt, completion = example["prompt"], example["completion"]
        if isinstance(prompt, str):
            bos = [] if tokenizer.bos_token_id is None else [tokenizer.bos_token_id]
            return bos + tokenizer(prompt, add_special_tokens=False)["input_ids"], str(completion)
        reference = completion[-1]["content"] if isinstance(completion, Sequence) else completion
        return _chat_prompt([drop_none(dict(m)) for m in prompt], tokenizer, example.get("tools")), str(reference)
    raise DataError(f"evaluation by generation needs prompts: '{data_format}' data has none; use "
                    "prompt-completion or conversational data.")


def prompts_and_references(rows: Any, tokenizer: PreTrainedTokenizerBase,
                           limit: int | None = None) -> tuple[list[list[int]], list[str]]:
    """`prompt_and_reference` of the first `limit` rows of a `datasets.Dataset`."""
    data_format = detect_format(rows.column_names)
    count = len(rows) if limit is None else min(limit, len(rows))
    pairs = [prompt_and_reference(rows[i], tokenizer, data_format) for i in range(count)]
    return [p for p, _ in pairs], [r for _, r in pairs]


def _chat_prompt(messages: list[dict], tokenizer: PreTrainedTokenizerBase, tools: Any = None) -> list[int]:
    """Rendered as training rendered it: the same template, tools and generation prompt."""
    ids, _ = render_chat(tokenizer, messages, template=chat_template_of(tokenizer, None), tools=parse_tools(tools),
                         add_generation_prompt=True)
    return ids
