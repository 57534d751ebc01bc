"""Prompts and reference answers of supervised examples, for evaluation by generation.

The prompt is tokenised the way training tokenised it (the chat template with its generation prompt,
or the prompt text), and then given training's one leading BOS (`special_tokens.ensure_bos`), so its
ids are a prefix of the training ids and the model is asked exactly what it learned to answer.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from transformers import PreTrainedTokenizerBase

from easytrain.data.chat_templates import chat_template_of, drop_none, parse_tools, render_chat
from easytrain.data.errors import DataError
from easytrain.data.row_errors import at_row, rows_as_stored
from easytrain.data.sft import CONVERSATIONAL, PROMPT_COMPLETION, SFTDataOptions, detect_format
from easytrain.data.special_tokens import encode_text, ensure_bos


def prompt_and_reference(example: Mapping[str, Any], tokenizer: PreTrainedTokenizerBase, data_format: str,
                         options: SFTDataOptions | None = None) -> tuple[list[int], str]:
    """`(prompt token ids, reference answer)` of one conversational or prompt-completion example.

    A conversation's reference is its last message, which must be the assistant's. `options` are those the
    training data was tokenised with (its `chat_template` and `add_bos` apply here too).
    """
    options = options or SFTDataOptions()
    if data_format == CONVERSATIONAL:
        messages = [drop_none(dict(m)) for m in example["messages"]]
        if not messages or messages[-1].get("role") != "assistant":
            raise DataError("evaluation by generation needs conversations that end with an assistant message.")
        ids = _chat_prompt(messages[:-1], tokenizer, options, example.get("tools"))
        return _with_bos(ids, tokenizer, options), str(messages[-1]["content"])
    if data_format == PROMPT_COMPLETION:
        prompt, completion = example["prompt"], example["completion"]
        if isinstance(prompt, str):
            return _with_bos(encode_text(tokenizer, prompt), tokenizer, options), str(completion)
        reference = completion[-1]["content"] if isinstance(completion, Sequence) else completion
        ids = _chat_prompt([drop_none(dict(m)) for m in prompt], tokenizer, options, example.get("tools"))
        return _with_bos(ids, tokenizer, options), str(reference)
    raise DataError(f"evaluation by generation needs prompts: '{data_format}' data has none; use "
                    "prompt-completion or conversational data.")


def prompts_and_references(rows: Any, tokenizer: PreTrainedTokenizerBase, limit: int | None = None,
                           options: SFTDataOptions | None = None) -> tuple[list[list[int]], list[str]]:
    """`prompt_and_reference` of the first `limit` rows of a `datasets.Dataset` (a bad row named as stored)."""
    data_format = detect_format(rows.column_names)
    count = len(rows) if limit is None else min(limit, len(rows))
    pairs = []
    with rows_as_stored(rows):
        for i in range(count):
            with at_row(i):
                pairs.append(prompt_and_reference(rows[i], tokenizer, data_format, options))
    return [p for p, _ in pairs], [r for _, r in pairs]


def _chat_prompt(messages: list[dict], tokenizer: PreTrainedTokenizerBase, options: SFTDataOptions,
                 tools: Any = None) -> list[int]:
    """Rendered as training rendered it: the same template, tools and generation prompt."""
    tools = parse_tools(tools)
    ids, _ = render_chat(tokenizer, messages, template=chat_template_of(tokenizer, options.chat_template, tools),
                         tools=tools, add_generation_prompt=True)
    return ids


def _with_bos(ids: list[int], tokenizer: PreTrainedTokenizerBase, options: SFTDataOptions) -> list[int]:
    """Training's BOS rule (`tokenize_example`), so the prompt is a token prefix of the training ids."""
    return ensure_bos(list(ids), [0] * len(ids), tokenizer.bos_token_id, options.add_bos)[0]
