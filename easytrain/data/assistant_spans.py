"""The assistant-token mask of a rendered chat, from its generation spans and each token's character offsets.

A token is supervised iff its character span overlaps a ``{% generation %}`` span of the rendered text; a
zero-width token (an empty offset span) iff its position lies inside one. Offsets must be read without the
post-processor's whitespace trimming (GPT-2-like ``ByteLevel(trim_offsets=True)``, ``RobertaProcessing``),
which would leave a span that starts or ends with a space (``' ' + content + eos``) touching no token, so a
turn would be lost or the mask would run on to the end of the text. Only a post-processor trims (a
pre-tokenizer's ``trim_offsets`` setting is not applied while pre-tokenising), so the text is encoded a second
time, by a copy of the backend without its post-processor, only when the post-processor trims. A backend that
cannot be copied (a pre-tokenizer written in Python) keeps its trimmed offsets, and the mask is then checked
against the text and refused if it is wrong. Special tokens written by the template are text like any other.
"""

from __future__ import annotations

import bisect
import json
import logging
import weakref
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from transformers import PreTrainedTokenizerBase

from easytrain.data.errors import DataError

logger = logging.getLogger("easytrain")

Span = tuple[int, int]


@dataclass(frozen=True)
class _Backend:
    """What one tokenizer's masks need from its backend, cached until the backend or its tokens change."""

    key: tuple[Any, int, bytes | None]  # the backend, the tokenizer's size, its post-processor's settings
    special: frozenset[int]  # ids of the special tokens
    untrimmed: Any  # a copy of the backend without its post-processor, or None
    trimmed_because: str | None  # why the offsets stay trimmed (None: they are not trimmed, or the copy undoes it)


_BACKENDS: weakref.WeakKeyDictionary[Any, _Backend] = weakref.WeakKeyDictionary()
_CHECKED: set[int] = set()  # hashes of the templates whose turn ends were checked (once per process)
_FIX = ("Set the tokenizer's post-processor not to trim offsets (e.g. `tokenizer.backend_tokenizer.post_processor "
        "= tokenizers.processors.ByteLevel(trim_offsets=False)`), or change the template so that no "
        "{% generation %} block starts or ends with whitespace.")


def assistant_tokens(tokenizer: PreTrainedTokenizerBase, text: str, spans: Sequence[Span],
                     template: str) -> tuple[list[int], list[int]]:
    """``text``'s token ids (as ``tokenizer(text, add_special_tokens=False)`` gives them) and its assistant mask.

    Raises:
        DataError: The tokenizer gives no character offsets, a non-empty generation span holds no token, or the
            offsets stay trimmed and the mask they give is not exactly the generation spans' tokens.
    """
    try:
        ids, offsets, trimmed_because = encode_with_offsets(tokenizer, text)
    except NotImplementedError as error:
        raise DataError("`assistant_only_loss=True` needs a fast tokenizer (one that reports character offsets); "
                        f"{type(tokenizer).__name__} does not. Load the tokenizer with `use_fast=True`.") from error
    if trimmed_because is None:
        mask = mask_from_spans(offsets, spans, text)
    else:
        mask = _checked_trimmed_mask(tokenizer, ids, offsets, spans, text, trimmed_because)
    _warn_if_turn_end_outside(tokenizer, ids, mask, offsets, spans, _backend_of(tokenizer).special, template)
    return ids, mask


def encode_with_offsets(tokenizer: PreTrainedTokenizerBase, text: str) -> tuple[list[int], Sequence[Span], str | None]:
    """``tokenizer(text, add_special_tokens=False)``'s ids, each token's character offsets (untrimmed where the
    backend can be copied without its post-processor), and why they stay trimmed (None: they are not).

    Raises:
        NotImplementedError: A slow tokenizer, which reports no offsets.
    """
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = [int(token) for token in encoded["input_ids"]]
    offsets: Sequence[Span] = encoded["offset_mapping"]
    backend = _backend_of(tokenizer)
    trimmed_because = backend.trimmed_because
    if backend.untrimmed is not None:
        encoding = backend.untrimmed.encode(text, add_special_tokens=False)
        if encoding.ids == ids:
            offsets = encoding.offsets
        else:
            trimmed_because = ("a copy of its backend without the post-processor tokenises this text differently "
                               "(the tokenizer's settings are not all in its serialised form)")
    return ids, offsets, trimmed_because


def mask_from_spans(offsets: Sequence[Span], spans: Sequence[Span], text: str) -> list[int]:
    """1 for each token whose offsets overlap one of ``spans`` (sorted, disjoint character ranges of ``text``).

    Raises:
        DataError: A non-empty span that no token overlaps, so its assistant turn could not be trained.
    """
    owners = _owners(offsets, spans)
    _require_covered(owners, spans, text, "its normalizer removes them")
    return [int(owner >= 0) for owner in owners]


def _owners(offsets: Sequence[Span], spans: Sequence[Span]) -> list[int]:
    """For each token, the index of the span it overlaps (a zero-width token: lies inside), or -1."""
    ends = [end for _, end in spans]
    owners = [-1] * len(offsets)
    for i, (start, end) in enumerate(offsets):
        j = bisect.bisect_right(ends, start)  # the first span ending after the token starts
        if j < len(spans) and (spans[j][0] < end if start < end else spans[j][0] <= start):
            owners[i] = j
    return owners


def _require_covered(owners: Sequence[int], spans: Sequence[Span], text: str, cause: str) -> None:
    covered = set(owners)
    for j, (start, end) in enumerate(spans):
        if start < end and j not in covered:
            raise DataError(
                f"The chat template's {{% generation %}} block at characters {start}-{end} ({text[start:end]!r}) "
                f"holds no token: the tokenizer maps none of its characters to a token ({cause}), so that "
                "assistant turn cannot be trained. Fix the row's assistant content, or use a tokenizer that keeps "
                "these characters."
            )


def _checked_trimmed_mask(tokenizer: PreTrainedTokenizerBase, ids: list[int], offsets: Sequence[Span],
                          spans: Sequence[Span], text: str, trimmed_because: str) -> list[int]:
    """The mask from trimmed offsets, if each span's supervised tokens are exactly its text.

    Trimmed offsets lie inside the tokens' characters, so a token they put in a span is in it; a token whose
    trimmed whitespace alone reaches into a span (or a whitespace token trimmed to a point inside one) is not
    seen. Decoding each span's supervised tokens back to the span's text shows that neither happened.
    """
    cause = f"its post-processor trims whitespace from token offsets (`trim_offsets=True`) and {trimmed_because}"
    owners = _owners(offsets, spans)
    _require_covered(owners, spans, text, cause)
    for j, (start, end) in enumerate(spans):
        tokens = [i for i, owner in enumerate(owners) if owner == j]
        if not tokens:
            continue
        got = tokenizer.decode(ids[tokens[0]:tokens[-1] + 1], skip_special_tokens=False,
                               clean_up_tokenization_spaces=False)
        if got != text[start:end] or len(tokens) != tokens[-1] - tokens[0] + 1:
            raise DataError(
                f"The assistant mask of the chat template's {{% generation %}} block at characters {start}-{end} "
                f"({text[start:end]!r}) cannot be built exactly: the tokenizer's {cause}, so its tokens would be "
                f"trained as {got!r}. {_FIX}"
            )
    return [int(owner >= 0) for owner in owners]


def _backend_of(tokenizer: PreTrainedTokenizerBase) -> _Backend:
    """The cached ``_Backend`` of ``tokenizer``; a new backend, added tokens or a new post-processor renew it."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    processor = getattr(backend, "post_processor", None)
    settings = _settings(processor)
    key = (backend, len(tokenizer), settings)
    cached = _BACKENDS.get(tokenizer)
    if cached is not None and cached.key[0] is backend and cached.key[1:] == key[1:]:
        return cached
    special = frozenset(int(i) for i, token in tokenizer.added_tokens_decoder.items() if token.special)
    special |= frozenset(tokenizer.all_special_ids)
    untrimmed, because = None, None
    if processor is not None and (settings is None or _trims(json.loads(settings))):
        try:
            untrimmed = _serialised_copy(backend)
        except Exception as error:  # noqa: BLE001 - tokenizers raises a bare Exception, e.g. for Python components
            because = f"its backend cannot be copied without it ({error})"
        else:
            untrimmed.post_processor = None  # it only adds special tokens (not asked for) and trims offsets
            untrimmed.no_truncation()  # a tokenizer.json's truncation or padding would change the copy's ids
            untrimmed.no_padding()
    cached = _Backend(key, special, untrimmed, because)
    _BACKENDS[tokenizer] = cached
    return cached


def _settings(processor: Any) -> bytes | None:
    """The post-processor's settings as JSON, or None if it has none to read."""
    try:
        return None if processor is None else processor.__getstate__()
    except Exception:  # noqa: BLE001 - unreadable: treated as one that may trim
        return None


def _trims(settings: Any) -> bool:
    """Whether post-processor ``settings`` (JSON, with nested processors of a ``Sequence``) trim offsets."""
    if isinstance(settings, dict):
        return settings.get("trim_offsets") is True or any(_trims(value) for value in settings.values())
    return isinstance(settings, list) and any(_trims(value) for value in settings)


def _serialised_copy(backend: Any) -> Any:
    """A copy of a ``tokenizers.Tokenizer``, through its JSON form (which a Python component cannot take)."""
    return type(backend).from_str(backend.to_str())


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
