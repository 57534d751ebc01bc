"""Special-token and field rules shared by every data format (SFT and preference pairs alike).

Exactly one leading BOS, an EOS appended unless the text already ends with one (after trailing
whitespace), plain-text tokenisation without the tokenizer's own special tokens, and type-checked
example fields with an error that names the field and the fix.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from transformers import PreTrainedTokenizerBase

from easytrain.data.errors import DataError


def ensure_bos(ids: list[int], mask: list[int], bos_id: int | None,
                add_bos: bool) -> tuple[list[int], list[int]]:
    """Collapse leading BOS copies to one, adding it when asked and missing."""
    if bos_id is None:
        return ids, mask
    leading = next((i for i, token in enumerate(ids) if token != bos_id), len(ids))
    if leading == 0 and not add_bos:
        return ids, mask
    return [bos_id] + ids[leading:], [0] + mask[leading:]

def ensure_eos(ids: list[int], mask: list[int], eos_id: int, tokenizer: PreTrainedTokenizerBase,
                supervised: bool) -> tuple[list[int], list[int]]:
    """Append EOS unless the last non-whitespace token already is one (ChatML ends ``<|im_end|>\\n``)."""
    last = last_content_index(ids, tokenizer)
    if last is not None and ids[last] == eos_id:
        return ids, mask
    return ids + [eos_id], mask + [int(supervised)]

def last_content_index(ids: Sequence[int], tokenizer: PreTrainedTokenizerBase) -> int | None:
    """Index of the last token that is not whitespace only, or None if there is none."""
    for index in range(len(ids) - 1, -1, -1):
        if tokenizer.decode([ids[index]], skip_special_tokens=False).strip():
            return index
    return None

def encode_text(tokenizer: PreTrainedTokenizerBase, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])

def eos_id(tokenizer: PreTrainedTokenizerBase) -> int:
    if tokenizer.eos_token_id is None:
        raise DataError(
            "The tokenizer has no EOS token, which `add_eos=True` needs so the model learns "
            "to stop; give the tokenizer an `eos_token` or set `add_eos=False`."
        )
    return int(tokenizer.eos_token_id)


def typed_field(example: Mapping[str, Any], name: str, kind: type, column: str | None = None) -> Any:
    """``example[name]``, checked to be a ``kind``; ``column`` is the user's column it was renamed from."""
    value = example.get(name)
    if not isinstance(value, kind):
        renamed = column not in (None, name)
        field = f"{column!r} (`text_column`, read as {name!r})" if renamed else repr(name)
        fix = "`text_column`" if renamed else "the `formatting_func`"
        raise DataError(
            f"Field {field} must be a {kind.__name__}, got {type(value).__name__} "
            f"({str(value)[:60]!r}); fix the data or {fix}."
        )
    return value
