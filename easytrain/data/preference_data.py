"""Preference pairs for DPO-style training: (prompt, chosen, rejected) -> two token sequences.

Formats, recognised from the columns: ``prompt`` + ``chosen`` + ``rejected`` (three strings, or a
prompt message list and two completion message lists), or only ``chosen`` + ``rejected`` as full
conversations whose longest common message prefix is the prompt (``split_implicit_prompt``).

Both sequences start with the same ``prompt_length`` prompt tokens (``preference_tokens``: strings are
tokenised apart where that reads as the joined texts, else as prompt + chosen and prompt + rejected joined;
a chat prompt is rendered once), so a log-ratio never sees a prompt-side difference such as a doubled BOS or a
template mismatch. Special tokens follow SFT (``easytrain.data.sft``): exactly one leading BOS, and an EOS appended (and
supervised) unless the completion already ends with one. ``loss_mask`` is 1 on completion tokens
only, EOS included, taken from the token boundary and never from token ids, so ``pad == eos`` cannot
unmask the EOS.

Truncation to ``max_length`` tokens per sequence (one cut of the prompt, shared by both):
``keep = min(P, max_prompt_length, max_length - min(C, min_completion_length))`` prompt tokens,
where P is the prompt's length and C the longer completion's (EOS included); the prompt keeps its
leading BOS (if any) and its last tokens, ``keep`` in all; then each completion keeps its first
``max_length - keep`` tokens. So the prompt is cut only when prompt + min(C,
min_completion_length) exceed ``max_length``; ``min_completion_length`` defaults to half of
``max_length``, so when prompt and completion are both long each keeps half. TRL's DPOTrainer
cuts differently: up to 0.28 it had a ``max_prompt_length`` (default 512 from 0.14); from 0.29 it
keeps the start of prompt + completion and, from 1.9, drops the pairs whose prompt fills
``max_length`` (docs/dpo.md, "Differences from TRL").
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, NamedTuple

import datasets
import numpy as np
from transformers import PreTrainedTokenizerBase

from easytrain.data.chat_templates import chat_template_of
from easytrain.data.columns import format_from_columns
from easytrain.data.errors import DataError
from easytrain.data.formatting import apply_formatting
from easytrain.data.preference_tokens import pair_tokens
from easytrain.data.preference_tokens import split_implicit_prompt as split_implicit_prompt  # re-exported
from easytrain.data.row_errors import NoExampleLeftError, at_row, rows_as_stored
from easytrain.data.special_tokens import (  # SFT's special-token rules: the same layout in SFT and DPO
    ensure_bos,
    ensure_eos,
    eos_id,
)
from easytrain.data.token_range import check_token_ids

PreferenceFormat = Literal["explicit_prompt", "implicit_prompt"]

#: Format -> the columns that select it, in the order they are tried.
PREFERENCE_FORMAT_COLUMNS: Mapping[PreferenceFormat, tuple[str, ...]] = {
    "explicit_prompt": ("prompt", "chosen", "rejected"),
    "implicit_prompt": ("chosen", "rejected"),
}

#: Columns of the tokenised dataset (``prompt_length`` and ``length`` stay out of batches).
PAIR_COLUMNS = ("prompt_length", "chosen_input_ids", "chosen_loss_mask", "rejected_input_ids",
                "rejected_loss_mask", "length")

#: The token-id columns (targets are these ids shifted; the prompt is in both).
PAIR_TOKEN_FIELDS = ("chosen_input_ids", "rejected_input_ids")

#: Keys of the statistics ``tokenize_preference_dataset`` returns.
PREFERENCE_STATS_KEYS = ("num_pairs", "num_kept", "prompt_truncated", "completion_truncated",
                         "dropped_no_supervised_tokens", "identical_pairs", "num_tokens", "num_supervised_tokens")

_FLAGS = ("tokens", "prompt_truncated", "completion_truncated", "chosen_supervised",
          "rejected_supervised", "identical")
_FEATURES = datasets.Features({
    "prompt_length": datasets.Value("int32"),
    **{f"{side}_{kind}": datasets.List(datasets.Value(dtype)) for side in ("chosen", "rejected")
       for kind, dtype in (("input_ids", "int32"), ("loss_mask", "int8"))},
    "length": datasets.Value("int32"),
    **{flag: datasets.Value("int32") for flag in _FLAGS},
})


@dataclass(frozen=True)
class PreferenceDataOptions:
    """How pairs become tokens, masks and cuts (see the module docstring for the truncation rule).

    Attributes:
        max_length: Most tokens per sequence, prompt + completion; None keeps all.
        max_prompt_length: Most prompt tokens (BOS included), applied even without ``max_length``.
        min_completion_length: Completion tokens guaranteed room before the prompt is cut;
            None means ``max_length // 2``.
        add_bos: Start every sequence with exactly one BOS (when the tokenizer has one).
        add_eos: End each completion with an EOS unless it already does, so the model learns to stop.
        chat_template: A Jinja template that replaces the tokenizer's own.
    """

    max_length: int | None = 1024
    max_prompt_length: int | None = None
    min_completion_length: int | None = None
    add_bos: bool = True
    add_eos: bool = True
    chat_template: str | None = None

    def __post_init__(self) -> None:
        for name, low in (("max_length", 2), ("max_prompt_length", 1), ("min_completion_length", 1)):
            value = getattr(self, name)
            if value is not None and value < low:
                raise DataError(f"`{name}` must be at least {low} or None, got {value}.")
        if self.max_length is not None and self.completion_room >= self.max_length:
            raise DataError(
                f"`min_completion_length` ({self.min_completion_length}) must be below `max_length` "
                f"({self.max_length}) so the prompt keeps a token; lower it or leave it None."
            )

    @property
    def completion_room(self) -> int:
        """Completion tokens that may push the prompt out (``min_completion_length`` resolved)."""
        return self.min_completion_length or (self.max_length or 2) // 2


class TokenizedPair(NamedTuple):
    """Two sequences sharing their first ``prompt_length`` tokens, and what truncation did."""

    prompt_length: int
    chosen_input_ids: list[int]
    chosen_loss_mask: list[int]
    rejected_input_ids: list[int]
    rejected_loss_mask: list[int]
    prompt_truncated: bool = False
    chosen_truncated: bool = False
    rejected_truncated: bool = False


def detect_preference_format(column_names: Sequence[str]) -> PreferenceFormat:
    """``explicit_prompt`` with a ``prompt`` column, else ``implicit_prompt``; both need chosen/rejected.

    Raises:
        DataError: No format fits; the message lists the columns found and expected.
    """
    return format_from_columns(column_names, PREFERENCE_FORMAT_COLUMNS, kind="preference",
                               fix="Rename the columns or pass a `formatting_func` that maps each example "
                                   "to {'prompt', 'chosen', 'rejected'}.")


def tokenize_pair(example: Mapping[str, Any], tokenizer: PreTrainedTokenizerBase,
                  options: PreferenceDataOptions = PreferenceDataOptions()) -> TokenizedPair:
    """Tokenise one pair: one prompt, two completions with SFT's BOS/EOS rules, then truncation.

    Raises:
        DataError: Missing or mistyped fields, or a template whose generation prompt is not a token
            prefix of the rendered conversation.
    """
    prompt, *responses = pair_tokens(example, tokenizer, options.chat_template)
    prompt, _ = ensure_bos(prompt, [0] * len(prompt), tokenizer.bos_token_id, options.add_bos)
    if options.add_eos:
        eos = eos_id(tokenizer)
        responses = [ensure_eos(ids, mask, eos, tokenizer, True) for ids, mask in responses]
    (chosen, _), (rejected, _) = responses
    keep = _prompt_keep(len(prompt), max(len(chosen), len(rejected)), options)
    kept_prompt = _keep_end(prompt, keep, tokenizer.bos_token_id)
    room = None if options.max_length is None else options.max_length - len(kept_prompt)
    sequences = [_sequence(kept_prompt, ids[:room], mask[:room]) for ids, mask in responses]
    return TokenizedPair(len(kept_prompt), *sequences[0], *sequences[1],
                         prompt_truncated=len(kept_prompt) < len(prompt),
                         chosen_truncated=room is not None and len(chosen) > room,
                         rejected_truncated=room is not None and len(rejected) > room)


def tokenize_preference_dataset(
    dataset: datasets.Dataset,
    tokenizer: PreTrainedTokenizerBase,
    options: PreferenceDataOptions = PreferenceDataOptions(),
    *,
    formatting_func: Callable[[Mapping[str, Any]], Mapping[str, Any]] | None = None,
    num_proc: int | None = None,
    vocab_size: int | None = None,
) -> tuple[datasets.Dataset, dict[str, int]]:
    """Tokenise every pair (cached ``datasets.map``), drop unusable ones and count everything.

    Args:
        dataset: Rows in one of the formats (or any columns ``formatting_func`` reads).
        tokenizer: The model's tokenizer; its chat template renders conversations.
        options: Special-token, template and truncation settings.
        formatting_func: Maps one example to a dict in one of the formats, applied first.
        num_proc: Worker processes for ``map`` (``None`` runs in-process).
        vocab_size: The model's vocabulary size: an id at or past it in ``PAIR_TOKEN_FIELDS`` (a tokenizer larger
            than the model) is refused, naming the pair; None checks nothing.

    Returns:
        ``(tokenized, stats)``: ``tokenized`` has the ``PAIR_COLUMNS`` (``*_loss_mask`` is 1 on
        completion tokens); ``stats`` has the ``PREFERENCE_STATS_KEYS``, to log. Truncation counts
        are pairs over the whole input; a pair where either completion keeps no supervised token is
        dropped and counted, never trained on silently. ``identical_pairs`` (kept) carry no
        preference signal.

    Raises:
        DataError: Unknown format, missing template or EOS, or a content the template cannot print.
        NoExampleLeftError: No pair left; ``within`` names the split (``token_range.rows_of``).
        RowError: An example cannot be tokenised (e.g. the chat template fails on it): names its row as the
            stored data has it (a held-out split's or a shuffle's row mapped back, see ``rows_as_stored``).
        TokenRangeError: A token id outside ``[0, vocab_size)``, its pair named as stored too.

    Example::

        rows = datasets.Dataset.from_list([{"prompt": "2+2=", "chosen": " 4", "rejected": " 5"}])
        pairs, stats = tokenize_preference_dataset(rows, tokenizer, PreferenceDataOptions(max_length=512))
        loader = TrainBatches(pair_rows(pairs), 8, seed=0,
                              collate=PairedCollate(bucket_lengths(512), tokenizer.pad_token_id))
    """
    with rows_as_stored(dataset):  # a bad pair is named as the stored data has it, not by its place in a split
        if formatting_func is not None:
            dataset = apply_formatting(dataset, formatting_func, PREFERENCE_FORMAT_COLUMNS, num_proc)
        data_format = detect_preference_format(dataset.column_names)
        _check_options(tokenizer, options, data_format, dataset)
        tokenized = dataset.map(
            _tokenize_batch, batched=True, with_indices=True, num_proc=num_proc, features=_FEATURES,
            remove_columns=dataset.column_names, load_from_cache_file=True, desc="Tokenizing pairs",
            fn_kwargs={"tokenizer": tokenizer, "options": options},
        )
        check_token_ids(tokenized, PAIR_TOKEN_FIELDS, vocab_size, tokenizer=tokenizer, rows_are="Preference pairs")
    stats = _stats(tokenized)
    if stats["num_kept"] == 0:
        raise NoExampleLeftError("No preference pair is left", f"every pair was dropped ({stats}). Check that "
                                 "completions are non-empty, or keep `add_eos=True` so an empty completion still "
                                 "teaches to stop.")
    kept = tokenized.filter(_keep, batched=True, num_proc=num_proc, desc="Dropping unusable pairs",
                            input_columns=["chosen_supervised", "rejected_supervised"])
    return kept.remove_columns(list(_FLAGS)), stats


def uses_chat_template(dataset: datasets.Dataset) -> bool:
    """Whether the pairs render through the chat template: message lists do, prompt/chosen/rejected strings are
    tokenised as they are. Rows it cannot tell (none, no 'chosen') count as rendering: their refusal comes later."""
    if not len(dataset) or "chosen" not in dataset.column_names:
        return True
    return isinstance(dataset[0]["chosen"], list)


def _prompt_keep(prompt: int, longest: int, options: PreferenceDataOptions) -> int:
    """Prompt tokens to keep: cut only when prompt + min(longest, completion room) overflow."""
    keep = prompt if options.max_prompt_length is None else min(prompt, options.max_prompt_length)
    if options.max_length is not None:
        keep = min(keep, options.max_length - min(longest, options.completion_room))
    return keep


def _keep_end(ids: list[int], keep: int, bos_id: int | None) -> list[int]:
    """The last ``keep`` tokens, a leading BOS kept in front (and counted)."""
    if len(ids) <= keep:
        return ids
    head = ids[:1] if bos_id is not None and ids[0] == bos_id else []
    tail = keep - len(head)
    return head + (ids[len(ids) - tail:] if tail > 0 else [])


def _sequence(prompt: list[int], completion: list[int], supervised: list[int]) -> tuple[list[int], list[int]]:
    """Ids and mask: the completion's supervised tokens, token 0 never (nothing precedes it)."""
    mask = [0] * len(prompt) + supervised
    if mask:
        mask[0] = 0
    return prompt + completion, mask


def _check_options(tokenizer: PreTrainedTokenizerBase, options: PreferenceDataOptions,
                   data_format: PreferenceFormat, dataset: datasets.Dataset) -> None:
    """Fail before any work when the options cannot be honoured for this data."""
    if options.add_eos:
        eos_id(tokenizer)
    if len(dataset) == 0:
        raise DataError("The preference dataset has no rows; give it at least one pair.")
    first = dataset[0]
    if data_format == "implicit_prompt" and not isinstance(first["chosen"], list):
        raise DataError(
            f"Without a 'prompt' column, 'chosen' and 'rejected' must be conversations (message "
            f"lists) sharing their prompt messages, got {type(first['chosen']).__name__}; add a "
            "'prompt' column, or split text pairs with a `formatting_func`."
        )
    if isinstance(first["chosen"], list):
        chat_template_of(tokenizer, options.chat_template)


def _tokenize_batch(batch: Mapping[str, Sequence[Any]], indices: Sequence[int], *,
                    tokenizer: PreTrainedTokenizerBase, options: PreferenceDataOptions) -> dict[str, list[Any]]:
    """Tokenise every pair; ``indices`` (rows of the whole dataset) name a bad one in the error."""
    rows = []
    for i, index in enumerate(indices):
        with at_row(index):
            rows.append(_row(tokenize_pair({k: v[i] for k, v in batch.items()}, tokenizer, options)))
    return {name: [row[name] for row in rows] for name in _FEATURES}


def _row(pair: TokenizedPair) -> dict[str, Any]:
    """The stored columns of one pair, and the flags the statistics are counted from."""
    chosen, rejected = pair.chosen_input_ids, pair.rejected_input_ids
    return {**{name: getattr(pair, name) for name in PAIR_COLUMNS[:5]},
            "length": max(len(chosen), len(rejected)), "tokens": len(chosen) + len(rejected),
            "prompt_truncated": int(pair.prompt_truncated),
            "completion_truncated": int(pair.chosen_truncated or pair.rejected_truncated),
            "chosen_supervised": sum(pair.chosen_loss_mask), "rejected_supervised": sum(pair.rejected_loss_mask),
            "identical": int(chosen == rejected)}


def _keep(chosen_supervised: Sequence[int], rejected_supervised: Sequence[int]) -> list[bool]:
    return [c > 0 and r > 0 for c, r in zip(chosen_supervised, rejected_supervised, strict=True)]


def _stats(tokenized: datasets.Dataset) -> dict[str, int]:
    flags = {k: v.astype(np.int64) for k, v in tokenized.with_format("numpy", columns=list(_FLAGS))[:].items()}
    supervised = flags["chosen_supervised"] + flags["rejected_supervised"]
    kept = (flags["chosen_supervised"] > 0) & (flags["rejected_supervised"] > 0)
    return {
        "num_pairs": len(tokenized),
        "num_kept": int(kept.sum()),
        "prompt_truncated": int(flags["prompt_truncated"].sum()),
        "completion_truncated": int(flags["completion_truncated"].sum()),
        "dropped_no_supervised_tokens": int((~kept).sum()),
        "identical_pairs": int(((flags["identical"] > 0) & kept).sum()),
        "num_tokens": int(flags["tokens"][kept].sum()),
        "num_supervised_tokens": int(supervised[kept].sum()),
    }
