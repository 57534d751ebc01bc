"""The assistant-token mask of a rendered chat, from its generation spans and each token's character offsets.

A token is supervised iff its character span overlaps a ``{% generation %}`` span of the rendered text; a
zero-width token (an empty offset span) iff its position lies inside one. Offsets are read without the
post-processor's whitespace trimming (GPT-2-like ``ByteLevel(trim_offsets=True)``), which would leave a span
that starts or ends with a space (``' ' + content + eos``) touching no token, so a turn would be lost or the
mask would run on to the end of the text. Special tokens written by the template are text like any other.
"""

from __future__ import annotations

import bisect
import logging
import weakref
from collections.abc import Sequence
from typing import Any

from transformers import PreTrainedTokenizerBase

from easytrain.data.errors import DataError

logger = logging.getLogger("easytrain")

Span = tuple[int, int]

# tokenizer -> (its backend, its size, an untrimmed copy of the backend, the ids of its special tokens); a new
# backend or added tokens make a new copy
_UNTRIMMED: weakref.WeakKeyDictionary[Any, tuple[Any, int, Any, frozenset[int]]] = weakref.WeakKeyDictionary()
_CHECKED: set[int] = set()  # hashes of the templates whose turn ends were checked (once per process)


def assistant_tokens(tokenizer: PreTrainedTokenizerBase, text: str, spans: Sequence[Span],
                     template: str) -> tuple[list[int], list[int]]:
    """``text``'s token ids (as ``tokenizer(text, add_special_tokens=False)`` gives them) and its assistant mask.

    Raises:
        DataError: The tokenizer gives no character offsets, or a non-empty generation span holds no token.
    """
    try:
        encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    except NotImplementedError as error:
        raise DataError("`assistant_only_loss=True` needs a fast tokenizer (one that reports character offsets); "
                        f"{type(tokenizer).__name__} does not. Load the tokenizer with `use_fast=True`.") from error
    ids = [int(token) for token in encoded["input_ids"]]
    offsets, special = _untrimmed_offsets(tokenizer, text, ids)
    offsets = offsets if offsets is not None else [tuple(pair) for pair in encoded["offset_mapping"]]
    mask = mask_from_spans(offsets, spans, text)
    _warn_if_turn_end_outside(tokenizer, ids, mask, offsets, spans, special, template)
    return ids, mask


def mask_from_spans(offsets: Sequence[Span], spans: Sequence[Span], text: str) -> list[int]:
    """1 for each token whose offsets overlap one of ``spans`` (sorted, disjoint character ranges of ``text``).

    Raises:
        DataError: A non-empty span that no token overlaps, so its assistant turn could not be trained.
    """
    ends = [end for _, end in spans]
    mask, covered = [0] * len(offsets), [False] * len(spans)
    for i, (start, end) in enumerate(offsets):
        j = bisect.bisect_right(ends, start)  # the first span ending after the token starts
        if j < len(spans) and (spans[j][0] < end if start < end else spans[j][0] <= start):
            mask[i], covered[j] = 1, True
    for (start, end), hit in zip(spans, covered, strict=True):
        if start < end and not hit:
            raise DataError(
                f"The chat template's {{% generation %}} block at characters {start}-{end} ({text[start:end]!r}) "
                "holds no token: the tokenizer maps none of its characters to a token (its normalizer removes "
                "them), so that assistant turn cannot be trained. Fix the row's assistant content, or use a "
                "tokenizer that keeps these characters."
            )
    return mask


def _untrimmed_offsets(tokenizer: PreTrainedTokenizerBase, text: str,
                       ids: list[int]) -> tuple[list[Span] | None, frozenset[int]]:
    """Offsets of ``text``'s tokens before any post-processor trims them, or None if they are not to be had."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    cached = _UNTRIMMED.get(tokenizer)
    if cached is None or cached[0] is not backend or cached[1] != len(tokenizer):
        special = frozenset(int(i) for i, token in tokenizer.added_tokens_decoder.items() if token.special)
        untrimmed = None
        if backend is not None:
            untrimmed = type(backend).from_str(backend.to_str())
            untrimmed.post_processor = None  # it only adds special tokens (not asked for) and trims offsets
        cached = (backend, len(tokenizer), untrimmed, special | frozenset(tokenizer.all_special_ids))
        _UNTRIMMED[tokenizer] = cached
    if cached[2] is None:
        return None, cached[3]
    encoding = cached[2].encode(text, add_special_tokens=False)
    return (list(encoding.offsets) if list(encoding.ids) == ids else None), cached[3]


def _warn_if_turn_end_outside(tokenizer: PreTrainedTokenizerBase, ids: list[int], mask: list[int],
                              offsets: Sequence[Span], spans: Sequence[Span], special: frozenset[int],
                              template: str) -> None:
    """Warn if the template's generation blocks end just before a special token (the end of turn).

    Such a block supervises the reply but not the token that ends it, so the model never learns to stop.
    Checked on the first rendering with a non-empty block, once per template and process.
    """
    if hash(template) in _CHECKED or not any(start < end for start, end in spans):
        return
    _CHECKED.add(hash(template))
    for start, end in spans:
        inside = [i for i, (a, _) in enumerate(offsets) if start <= a < end and mask[i]]
        after = next((i for i, (a, _) in enumerate(offsets) if a >= end and not mask[i]), None)
        if not inside or after is None or ids[inside[-1]] in special or ids[after] not in special:
            continue
        token = tokenizer.convert_ids_to_tokens(ids[after])
        logger.warning(
            "The chat template's {%% generation %%} blocks end just before %r, so the model is never trained to "
            "emit the token that ends its turn and will not learn to stop. Move it inside the block, e.g. "
            "`{%% generation %%}{{ message.content + %r }}{%% endgeneration %%}` (`chat_template`; on the "
            "command line `--chat_template_path FILE`).", token, token)
        return
