"""Prompts and reference answers of supervised examples, for evaluation by generation.

The prompt is tokenised the way training tokenised it (the chat template with its generation prompt, or a prompt
string's training ids before the completion's first token: the prompt tokenised alone wherever training tokenised
prompt and completion apart, see `prompt_completion`), and then given training's one leading BOS
(`special_tokens.ensure_bos`), so its ids are a prefix of the training ids and the model is asked exactly what it
learned to answer. Training's `max_length` cut applies too (`cut_as_trained`): the prompt is the part of the
example's truncated ids that comes before its answer, so it is at most `max_length - 1` tokens, and an example whose
cut keeps no answer token (or that `truncation_side="drop"` drops) gives no prompt: it is skipped, counted and
warned about, as is one whose answer is an assistant tool call with no text (a valid training row with nothing to
compare a generation with).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping, Sequence
from typing import Any

from transformers import PreTrainedTokenizerBase

from easytrain.data.chat_templates import chat_template_of, parse_tools, render_chat
from easytrain.data.errors import DataError
from easytrain.data.message_content import content_text, messages_for_template
from easytrain.data.prompt_completion import prompt_completion_tokens
from easytrain.data.row_errors import at_row, rows_as_stored
from easytrain.data.sft import CONVERSATIONAL, PROMPT_COMPLETION, SFTDataOptions, detect_format, tokenize_example
from easytrain.data.special_tokens import ensure_bos

logger = logging.getLogger("easytrain")


def prompt_and_reference(example: Mapping[str, Any], tokenizer: PreTrainedTokenizerBase, data_format: str,
                         options: SFTDataOptions | None = None) -> tuple[list[int], str]:
    """`(prompt token ids, reference answer)` of one conversational or prompt-completion example.

    A conversation's reference is its last message, which must be the assistant's. `options` are those the
    training data was tokenised with (its `chat_template`, `add_bos`, `max_length` and `truncation_side` apply
    here too). The prompt ids are `[]` when training's cut keeps no token of the answer (see `cut_as_trained`; the
    reference is still returned), and both are empty (`[]`, `""`) when the answer is a tool call with no text.
    """
    prompt, reference, _ = _prompt_as_trained(example, tokenizer, data_format, options or SFTDataOptions())
    return (prompt, reference) if reference is not None else ([], "")


def prompts_and_references(rows: Any, tokenizer: PreTrainedTokenizerBase, limit: int | None = None,
                           options: SFTDataOptions | None = None) -> tuple[list[list[int]], list[str]]:
    """`prompt_and_reference` of the first `limit` rows of a `datasets.Dataset` (a bad row named as stored).

    Rows whose prompt training's cut leaves without an answer, or whose answer is a tool call with no text, are
    skipped; skipped and cut prompts are warned about.

    Raises:
        DataError: A row cannot be rendered (naming it), or every row was skipped.
    """
    data_format, options = detect_format(rows.column_names), options or SFTDataOptions()
    count = len(rows) if limit is None else min(limit, len(rows))
    prompts, references, cut, tool_calls = [], [], 0, 0
    with rows_as_stored(rows):
        for i in range(count):
            with at_row(i):
                prompt, reference, was_cut = _prompt_as_trained(rows[i], tokenizer, data_format, options)
            tool_calls += reference is None
            if prompt and reference is not None:
                prompts.append(prompt)
                references.append(reference)
                cut += was_cut
    _report(count, count - len(prompts), cut, options, tool_calls)
    return prompts, references


def cut_as_trained(prompt: list[int], example_length: int, options: SFTDataOptions, bos_id: int | None) -> list[int]:
    """The part of `prompt` that training's `max_length` cut of its example (`example_length` tokens, the prompt
    first) keeps before the answer; `[]` when the cut keeps no answer token after it or drops the example.

    `"right"` keeps the example's start, so the prompt whole while the answer's first token fits; `"left"` keeps the
    BOS and the end, so the prompt loses its start (BOS kept) to the answer's tokens.
    """
    limit = options.max_length
    if limit is None or example_length <= limit:
        return prompt
    if options.truncation_side == "drop":
        return []
    if options.truncation_side == "right":
        return prompt if len(prompt) < limit else []
    keep = 1 if bos_id is not None and prompt[:1] == [bos_id] else 0  # the left cut keeps the BOS, then the end
    room = limit - (example_length - len(prompt))  # the prompt's tokens the cut leaves, BOS included
    return prompt[:keep] + prompt[len(prompt) - (room - keep):] if room > keep else []


def _prompt_as_trained(example: Mapping[str, Any], tokenizer: PreTrainedTokenizerBase, data_format: str,
                       options: SFTDataOptions) -> tuple[list[int], str | None, bool]:
    """The prompt cut as training cuts its example, the reference (None: a tool call with no text), and whether the
    cut shortened the prompt.

    The example is rendered whole only where its length decides the cut: a right cut keeps the prompt's
    start, so only the prompt's own length matters."""
    prompt, reference = _whole_prompt(example, tokenizer, data_format, options)
    if reference is None:
        return [], None, False
    length = len(prompt) + 1  # an answer token at least
    if options.max_length is not None and options.truncation_side != "right":
        whole = dataclasses.replace(options, max_length=None)
        length = len(tokenize_example(example, tokenizer, whole, data_format).input_ids)
    cut = cut_as_trained(prompt, length, options, tokenizer.bos_token_id)
    return cut, reference, 0 < len(cut) < len(prompt)


def _whole_prompt(example: Mapping[str, Any], tokenizer: PreTrainedTokenizerBase, data_format: str,
                  options: SFTDataOptions) -> tuple[list[int], str | None]:
    """The prompt's ids before any cut, with training's BOS rule, and the reference's text (None, and no ids, for an
    answer that is a tool call with no text)."""
    if data_format == CONVERSATIONAL:
        messages = example["messages"]
        if not messages or not isinstance(messages[-1], Mapping) or messages[-1].get("role") != "assistant":
            raise DataError("evaluation by generation needs conversations that end with an assistant message.")
        if _tool_call_only(messages[-1]):
            return [], None
        ids = _chat_prompt(messages[:-1], tokenizer, options, example.get("tools"))
        return _with_bos(ids, tokenizer, options), content_text(messages[-1].get("content"), "the last message")
    if data_format == PROMPT_COMPLETION:
        prompt, completion = example["prompt"], example["completion"]
        if isinstance(prompt, str):
            return _with_bos(_string_prompt(prompt, str(completion), tokenizer), tokenizer, options), str(completion)
        if isinstance(completion, Sequence) and not isinstance(completion, str):
            if completion and _tool_call_only(completion[-1]):
                return [], None
            reference = content_text(completion[-1].get("content"), "the completion's last message")
        else:
            reference = str(completion)
        ids = _chat_prompt(prompt, tokenizer, options, example.get("tools"))
        return _with_bos(ids, tokenizer, options), reference
    raise DataError(f"evaluation by generation needs prompts: '{data_format}' data has none; use "
                    "prompt-completion or conversational data.")


def _string_prompt(prompt: str, completion: str, tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """The training ids before the completion's first token (`prompt_completion_tokens`): the prompt tokenised alone
    where training tokenised it apart, else the joined text's tokens before the completion's (a SentencePiece-style
    '▁four' holding the prompt's trailing space is the answer's, so the prompt ends before it)."""
    ids, mask = prompt_completion_tokens(tokenizer, prompt, completion)
    return ids[:next((i for i, bit in enumerate(mask) if bit), len(ids))]


def _tool_call_only(message: Any) -> bool:
    """An assistant message that is a tool call with no content (valid for training): no text to compare with."""
    return isinstance(message, Mapping) and message.get("content") is None and bool(message.get("tool_calls"))


def _chat_prompt(messages: list[Any], tokenizer: PreTrainedTokenizerBase, options: SFTDataOptions,
                 tools: Any = None) -> list[int]:
    """Rendered as training rendered it: the same template, tools, contents and generation prompt."""
    tools = parse_tools(tools)
    template = chat_template_of(tokenizer, options.chat_template, tools)
    ids, _ = render_chat(tokenizer, messages_for_template(messages, template), template=template, tools=tools,
                         add_generation_prompt=True)
    return ids


def _with_bos(ids: list[int], tokenizer: PreTrainedTokenizerBase, options: SFTDataOptions) -> list[int]:
    """Training's BOS rule (`tokenize_example`), so the prompt is a token prefix of the training ids."""
    return ensure_bos(list(ids), [0] * len(ids), tokenizer.bos_token_id, options.add_bos)[0]


def _report(count: int, skipped: int, cut: int, options: SFTDataOptions, tool_calls: int = 0) -> None:
    """Warn of skipped and cut prompts (`tool_calls` of the skipped ones answer with a tool call and no text);
    refuse when no prompt is left to generate from."""
    if not skipped and not cut:
        return
    limit, no_answer = options.max_length, skipped - tool_calls
    if skipped == count and not no_answer:
        raise DataError(f"Evaluation by generation has no prompt: each of the {count} examples answers with a tool "
                        "call and no text, so no generation can be compared with it. Give validation rows that "
                        "answer in text, or set `generation_eval_samples=0`.")
    if skipped == count:
        calls = f" ({tool_calls} answer with a tool call and no text)" if tool_calls else ""
        raise DataError(
            f"Evaluation by generation has no prompt: each of the {count} examples{calls}, cut to {limit} tokens as "
            f"training cuts it (`truncation_side={options.truncation_side!r}`), keeps no token of its answer. Raise "
            "`max_length`, use `truncation_side='left'` (the prompt loses its start), or set "
            "`generation_eval_samples=0`."
        )
    reasons = [f"{tool_calls} answer with a tool call and no text"] * bool(tool_calls) + [
        f"training's cut to {limit} tokens keeps no token of the answer of {no_answer}"] * bool(no_answer)
    logger.warning("Evaluation by generation: %d of the %d prompts skipped (%s), %d cut at the left as training cuts "
                   "their examples.", skipped, count, "; ".join(reasons) or "none", cut)
