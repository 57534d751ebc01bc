"""Supervised fine-tuning data: examples -> ``input_ids`` and a per-token ``loss_mask``.

Three formats, recognised from the columns: language modelling (``text``), prompt-completion
(``prompt`` + ``completion``, strings or message lists) and conversational (``messages``).
Every mask comes from how the example was tokenised (prompt and completion tokenised apart where
that reads as the joined text, else the completion's character offsets in the joined text; prefix
renderings; the template's ``{% generation %}`` blocks; see ``prompt_completion``), never from
searching for a response string or for token ids, so ``pad_token == eos_token`` cannot unmask the EOS.

``loss_mask[i] == 1`` means token ``i`` is supervised: the model is trained to predict it from
the tokens before it. Token 0 is never supervised, since nothing precedes it.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, NamedTuple

import datasets
import numpy as np
from transformers import PreTrainedTokenizerBase

from easytrain.data.chat_templates import (
    chat_template_of,
    chat_templates_of,
    parse_tools,
    render_chat,
    require_generation_markers,
)
from easytrain.data.columns import format_from_columns
from easytrain.data.errors import DataError
from easytrain.data.formatting import apply_formatting
from easytrain.data.message_content import messages_for_template, roles_hint
from easytrain.data.prompt_completion import (last_content_supervised, render_prompt_completion_messages,
                                              render_prompt_completion_text)
from easytrain.data.row_errors import NoExampleLeftError, at_row, rows_as_stored
from easytrain.data.special_tokens import encode_text, ensure_bos, ensure_eos, eos_id, typed_field
from easytrain.data.token_range import check_token_ids

DataFormat = Literal["language_modeling", "prompt_completion", "conversational"]
TruncationSide = Literal["right", "left", "drop"]

LANGUAGE_MODELING: DataFormat = "language_modeling"
PROMPT_COMPLETION: DataFormat = "prompt_completion"
CONVERSATIONAL: DataFormat = "conversational"

#: Format -> the columns that select it, in the order they are tried.
FORMAT_COLUMNS: Mapping[DataFormat, tuple[str, ...]] = {
    CONVERSATIONAL: ("messages",),
    PROMPT_COMPLETION: ("prompt", "completion"),
    LANGUAGE_MODELING: ("text",),
}

#: Keys of the statistics ``tokenize_sft_dataset`` returns.
SFT_STATS_KEYS = (
    "num_examples", "num_kept", "truncated", "dropped_too_long",
    "dropped_no_supervised_tokens", "num_tokens", "num_supervised_tokens",
)

_FEATURES = datasets.Features({
    "input_ids": datasets.List(datasets.Value("int32")), "loss_mask": datasets.List(datasets.Value("int8")),
    "length": datasets.Value("int32"), "num_supervised": datasets.Value("int32"),
    "truncated": datasets.Value("int8"), "too_long": datasets.Value("int8"), "empty": datasets.Value("int8"),
})


@dataclass(frozen=True)
class SFTDataOptions:
    """How examples become tokens and masks.

    Attributes:
        max_length: Most tokens per example (BOS and EOS included); None keeps all.
        truncation_side: For longer examples: ``"right"`` keeps the start, ``"left"``
            keeps BOS and the end, ``"drop"`` drops the example. All are counted.
        assistant_only_loss: Conversational data: supervise only the assistant turns
            (the template's ``{% generation %}`` blocks); otherwise every token.
        completion_only_loss: Prompt-completion data: supervise only the completion.
        add_bos: Make the example start with exactly one BOS (when the tokenizer has one).
        add_eos: Make the example end with an EOS unless it already does (trailing
            whitespace after it allowed), so the model learns to stop.
        chat_template: A Jinja template that replaces the tokenizer's own (or the name of one
            of the tokenizer's named templates).
        text_column: The user's column that holds the plain text (renamed ``text`` before
            tokenising), named in row errors.
    """

    max_length: int | None = 1024
    truncation_side: TruncationSide = "right"
    assistant_only_loss: bool = False
    completion_only_loss: bool = True
    add_bos: bool = True
    add_eos: bool = True
    chat_template: str | None = None
    text_column: str = "text"

    def __post_init__(self) -> None:
        if self.max_length is not None and self.max_length < 2:
            raise DataError(
                f"`max_length` must be at least 2 tokens (one input, one target), got "
                f"{self.max_length}; use e.g. 1024, or None for no limit."
            )
        if self.truncation_side not in ("right", "left", "drop"):
            raise DataError(
                f"`truncation_side` must be 'right', 'left' or 'drop', got {self.truncation_side!r}."
            )


class TokenizedExample(NamedTuple):
    """One example's tokens, which of them are supervised, and what truncation did; ``empty``: it rendered to no
    text (special tokens and whitespace only), so it has no tokens."""

    input_ids: list[int]
    loss_mask: list[int]
    truncated: bool = False
    too_long: bool = False
    empty: bool = False


def detect_format(column_names: Sequence[str]) -> DataFormat:
    """The data format the columns select: ``messages``, then ``prompt``+``completion``, then ``text``.

    Raises:
        DataError: No format fits; the message lists the columns found and expected.
    """
    names = set(column_names)
    hint = (" A prompt-completion dataset needs both 'prompt' and 'completion'."
            if ("prompt" in names) != ("completion" in names) else "")
    return format_from_columns(names, FORMAT_COLUMNS, kind="SFT", hint=hint,
                               fix="Rename the columns, set `text_column` to the column holding plain text, or pass a "
                               "`formatting_func` that maps each example to one of these formats.")


def tokenize_example(
    example: Mapping[str, Any],
    tokenizer: PreTrainedTokenizerBase,
    options: SFTDataOptions,
    data_format: DataFormat,
) -> TokenizedExample:
    """Tokenise one example of ``data_format`` into ids and a supervised-token mask.

    Special tokens: one BOS at position 0 (none if the tokenizer has none), one EOS at the
    end (not added when the last non-whitespace token already is one). An added EOS is
    supervised for text formats, and for chats when the turn it closes is. Then
    ``max_length`` applies. An example that renders to no text (an empty string, or a chat
    whose roles the template skips, leaving only its special tokens) has no tokens: its EOS
    alone would teach the model to stop at once.

    Raises:
        DataError: Missing fields, a template unable to make the requested mask, or a
            prompt rendering that is not a token prefix of the full conversation.
    """
    ids, mask, eos_supervised = _render(example, tokenizer, options, data_format)
    if not _has_text(ids, tokenizer):  # nothing to learn, and no EOS-only example either
        return TokenizedExample([], [], empty=True)
    ids, mask = ensure_bos(ids, mask, tokenizer.bos_token_id, options.add_bos)
    if options.add_eos:
        ids, mask = ensure_eos(ids, mask, eos_id(tokenizer), tokenizer, eos_supervised)
    out = _truncate(ids, mask, options, has_bos=ids[0] == tokenizer.bos_token_id)
    if out.loss_mask:
        out.loss_mask[0] = 0  # nothing precedes token 0, so nothing can predict it
    return out


def tokenize_sft_dataset(
    dataset: datasets.Dataset,
    tokenizer: PreTrainedTokenizerBase,
    options: SFTDataOptions = SFTDataOptions(),
    *,
    formatting_func: Callable[[Mapping[str, Any]], Mapping[str, Any]] | None = None,
    num_proc: int | None = None,
    vocab_size: int | None = None,
) -> tuple[datasets.Dataset, dict[str, int]]:
    """Tokenise a whole dataset, drop what cannot be trained on, and count everything.

    Both the optional ``formatting_func`` and the tokenisation are cached ``datasets.map``
    calls, so a rerun over the same file-backed data reuses the Arrow files.

    Args:
        dataset: Rows in one of the three formats (or any columns ``formatting_func`` reads).
        tokenizer: The model's tokenizer; its chat template renders conversations.
        options: Masking, special-token and truncation settings.
        formatting_func: Maps one example to a dict in one of the formats, applied first.
        num_proc: Worker processes for ``map`` (``None`` runs in-process).
        vocab_size: The model's vocabulary size: an id at or past it (a tokenizer larger than the model) is
            refused, naming the example; None checks nothing.

    Returns:
        ``(tokenized, stats)``: ``tokenized`` has columns ``input_ids``, ``loss_mask`` (0/1
        per token) and ``length``; ``stats`` has the keys in ``SFT_STATS_KEYS``, which the
        trainer should log. Dropped examples (too long with ``truncation_side="drop"``, or
        left without a supervised token) are counted, never silently trained with zero loss.

    Raises:
        DataError: Unknown format, bad template for the options, or a content the template cannot print.
        NoExampleLeftError: No example left; ``within`` names the split (``token_range.rows_of``).
        RowError: An example cannot be tokenised (e.g. the chat template fails on it): names its row as the
            stored data has it (a held-out split's or a shuffle's row mapped back, see ``rows_as_stored``).
        TokenRangeError: A token id outside ``[0, vocab_size)``, its example named as stored too.

    Example::

        rows = datasets.Dataset.from_list([{"messages": [{"role": "user", "content": "Hi"},
                                                         {"role": "assistant", "content": "Hello!"}]}])
        tokenized, stats = tokenize_sft_dataset(rows, tokenizer, SFTDataOptions(assistant_only_loss=True))
        packed = pack_examples(tokenized, seq_length=1024)  # or PaddedCollate(bucket_lengths(1024))
    """
    with rows_as_stored(dataset):  # a bad row is named as the stored data has it, not by its place in a split
        if formatting_func is not None:
            dataset = apply_formatting(dataset, formatting_func, FORMAT_COLUMNS, num_proc)
        data_format = detect_format(dataset.column_names)
        _check_options(tokenizer, options, data_format, dataset)
        tokenized = dataset.map(
            _tokenize_batch, batched=True, with_indices=True, num_proc=num_proc, features=_FEATURES,
            remove_columns=dataset.column_names, load_from_cache_file=True, desc="Tokenizing SFT data",
            fn_kwargs={"tokenizer": tokenizer, "options": options, "data_format": data_format},
        )
        check_token_ids(tokenized, ("input_ids",), vocab_size, tokenizer=tokenizer, rows_are="SFT examples")
    stats = _stats(tokenized)
    if stats["num_kept"] == 0:
        raise NoExampleLeftError("No example is left", _why_none_is_left(stats, tokenized, dataset, data_format))
    kept = tokenized.filter(_keep, batched=True, input_columns=["num_supervised", "too_long"],
                            num_proc=num_proc, desc="Dropping unusable examples")
    return kept.remove_columns(["num_supervised", "truncated", "too_long", "empty"]), stats


def _why_none_is_left(stats: Mapping[str, int], tokenized: datasets.Dataset, dataset: datasets.Dataset,
                      data_format: DataFormat) -> str:
    """The counts and the fixes; for chats that rendered to special tokens only, the roles the template skipped."""
    empty = [index for index, flag in enumerate(tokenized["empty"]) if flag]
    fixes = ("Raise `max_length`, use `truncation_side='left'` or 'right' instead of 'drop', check that examples have "
             "assistant turns / non-empty completions, or set the *_only_loss options to False.")
    if not empty:
        return f"every example was dropped ({stats}). {fixes}"
    if data_format == CONVERSATIONAL:
        why = f"rendered to special tokens only: {roles_hint(dataset.select(empty[:1000])['messages'])}."
    else:
        why = "are empty or whitespace only."
    rest = "" if len(empty) == stats["num_examples"] else f" For the others: {fixes}"
    return f"every example was dropped ({stats}); {len(empty)} of them {why}{rest}"


def uses_chat_template(data_format: DataFormat, dataset: datasets.Dataset) -> bool:
    """Whether rows of this format render through the chat template: conversations, and prompt-completion rows
    whose prompt is a message list (plain strings are tokenised as they are)."""
    return data_format == CONVERSATIONAL or bool(
        data_format == PROMPT_COMPLETION and len(dataset) and not isinstance(dataset[0]["prompt"], str))


def _check_options(tokenizer: PreTrainedTokenizerBase, options: SFTDataOptions,
                   data_format: DataFormat, dataset: datasets.Dataset) -> None:
    """Fail before any work when the options cannot be honoured for this data."""
    if options.add_eos:
        eos_id(tokenizer)
    uses_template = uses_chat_template(data_format, dataset)
    if options.assistant_only_loss and not uses_template:
        raise DataError(
            f"`assistant_only_loss=True` needs conversational data (a 'messages' column of "
            f"role/content dicts), but this dataset is {data_format} (columns "
            f"{dataset.column_names}); set `assistant_only_loss=False` or convert the data."
        )
    if uses_template:
        templates = chat_templates_of(tokenizer, options.chat_template)  # named ones: a `default` is required
        if options.assistant_only_loss and len(templates) == 1:  # named ones: each row's, as it renders (tools pick)
            require_generation_markers(templates[0])


def _render(example: Mapping[str, Any], tokenizer: PreTrainedTokenizerBase,
            options: SFTDataOptions, data_format: DataFormat) -> tuple[list[int], list[int], bool]:
    """Ids and mask before BOS/EOS handling, and whether an appended EOS is supervised."""
    if data_format == LANGUAGE_MODELING:
        ids = encode_text(tokenizer, typed_field(example, "text", str, column=options.text_column))
        return ids, [1] * len(ids), True
    if data_format == CONVERSATIONAL:
        return _render_conversation(example, tokenizer, options)
    if data_format == PROMPT_COMPLETION:
        if isinstance(example.get("prompt"), str):
            return render_prompt_completion_text(example, tokenizer, options)
        return render_prompt_completion_messages(example, tokenizer, options)
    raise DataError(f"Unknown SFT data format {data_format!r}; use one of {list(FORMAT_COLUMNS)}.")


def _render_conversation(example: Mapping[str, Any], tokenizer: PreTrainedTokenizerBase,
                         options: SFTDataOptions) -> tuple[list[int], list[int], bool]:
    tools = parse_tools(example.get("tools"))
    template = chat_template_of(tokenizer, options.chat_template, tools)
    if options.assistant_only_loss:
        require_generation_markers(template)
    messages = messages_for_template(typed_field(example, "messages", list), template)
    ids, assistant_mask = render_chat(tokenizer, messages, template=template, tools=tools,
                                      assistant_mask=options.assistant_only_loss)
    mask = assistant_mask if assistant_mask is not None else [1] * len(ids)
    return ids, mask, last_content_supervised(ids, mask, tokenizer)


def _truncate(ids: list[int], mask: list[int], options: SFTDataOptions,
              has_bos: bool) -> TokenizedExample:
    limit = options.max_length
    if limit is None or len(ids) <= limit:
        return TokenizedExample(ids, mask)
    if options.truncation_side == "drop":
        return TokenizedExample([], [], too_long=True)
    if options.truncation_side == "right":
        return TokenizedExample(ids[:limit], mask[:limit], truncated=True)
    keep = 1 if has_bos else 0  # left: keep the BOS, then the end
    tail = limit - keep
    return TokenizedExample(ids[:keep] + ids[-tail:], mask[:keep] + mask[-tail:], truncated=True)


def _has_text(ids: Sequence[int], tokenizer: PreTrainedTokenizerBase) -> bool:
    """Whether a token is text: neither special nor whitespace only (decoded one by one, so usually a token or two)."""
    return any(tokenizer.decode([token], skip_special_tokens=True).strip() for token in ids)


def _tokenize_batch(batch: Mapping[str, Sequence[Any]], indices: Sequence[int], *,
                    tokenizer: PreTrainedTokenizerBase, options: SFTDataOptions,
                    data_format: DataFormat) -> dict[str, list[Any]]:
    """Tokenise every row and record the flags the statistics are counted from.

    ``indices`` are the rows' indices in the whole dataset, so an error names the bad row.
    """
    rows = []
    for i, index in enumerate(indices):
        with at_row(index):
            rows.append(tokenize_example({k: v[i] for k, v in batch.items()}, tokenizer, options, data_format))
    return {
        "input_ids": [row.input_ids for row in rows],
        "loss_mask": [row.loss_mask for row in rows],
        "length": [len(row.input_ids) for row in rows],
        "num_supervised": [sum(row.loss_mask) for row in rows],
        "truncated": [int(row.truncated) for row in rows],
        "too_long": [int(row.too_long) for row in rows],
        "empty": [int(row.empty) for row in rows],
    }


def _keep(num_supervised: Sequence[int], too_long: Sequence[int]) -> list[bool]:
    return [n > 0 and not long for n, long in zip(num_supervised, too_long, strict=True)]


def _stats(tokenized: datasets.Dataset) -> dict[str, int]:
    columns = tokenized.with_format("numpy", columns=["length", "num_supervised", "truncated", "too_long"])[:]
    length, supervised = columns["length"].astype(np.int64), columns["num_supervised"].astype(np.int64)
    too_long = columns["too_long"].astype(bool)
    kept = (supervised > 0) & ~too_long
    return {
        "num_examples": len(tokenized),
        "num_kept": int(kept.sum()),
        "truncated": int(columns["truncated"].astype(bool).sum()),
        "dropped_too_long": int(too_long.sum()),
        "dropped_no_supervised_tokens": int(((supervised == 0) & ~too_long).sum()),
        "num_tokens": int(length[kept].sum()),
        "num_supervised_tokens": int(supervised[kept].sum()),
    }
