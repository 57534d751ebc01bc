"""The token id fields of a config or ``generation_config.json``: one rule for a load, an export and a model built
from a config, so that what an export writes, the reload accepts.

transformers keeps any value in these fields without a word (5.x only warns at ``generate`` of a negative or float
EOS) and checks none against ``vocab_size``: an EOS of -1, or one no logit can produce (>= ``vocab_size``), makes
``generate`` run to its length cap; a ``decoder_start_token_id`` or ``bos_token_id`` past the vocabulary is an id
the embedding does not hold. A ``pad_token_id`` past the vocabulary is accepted, as a negative one is: real
configs hold both (LLaMA-1 conversions -1; a pad added to the tokenizer after training sits at ``vocab_size``),
transformers fails on it only when a finished row's pad is fed back (IndexError), and ``generate`` drops such a
pad from a config, with a warning, for the first EOS id (`easytrain.sampling_config.fill_settings`).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

#: Each field: whether it may hold a list of ids (transformers' types: several EOS ids end a turn in instruct
#: models), and whether an id outside [0, vocab_size) is kept (the pad, as above).
TOKEN_ID_FIELDS = {"eos_token_id": (True, False), "decoder_start_token_id": (True, False),
                   "pad_token_id": (False, True), "bos_token_id": (False, False)}


def _is_id(value: Any, negative: bool) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and (negative or value >= 0)


def _ids(value: Any, listed: bool, negative: bool) -> list[int] | None:
    """The ids a field holds, or None where it holds something else than an id (or, where allowed, a list)."""
    if _is_id(value, negative):
        return [value]
    if listed and isinstance(value, list) and all(_is_id(token, negative) for token in value):
        return value
    return None


def token_id_refusal(source: str, fields: Mapping[str, Any], vocab_size: int | None, fix: str) -> str | None:
    """Why `fields` (of `source`, e.g. a file's path) hold no valid token ids, or None: each field null, an int (or,
    where transformers takes one, a list of ints), in [0, `vocab_size`) except the pad (see the module docstring).
    `vocab_size`: None checks no range. `fix`: how to mend `source` ("{field}" is replaced by the field)."""
    for field, (listed, pad) in TOKEN_ID_FIELDS.items():
        value = fields.get(field)
        if value is None:
            continue
        ids = _ids(value, listed, negative=pad)
        if ids is None:
            sign = "" if pad else "non-negative "
            kind = f"a {sign}int, a list of them, or null" if listed else f"one {sign}int, or null"
            return (f"{source} sets '{field}' to {json.dumps(value)}, which is no token id: it must be {kind}. "
                    f"{fix.format(field=field)}")
        beyond = [] if pad or vocab_size is None else [token for token in ids if token >= vocab_size]
        if beyond:
            effect = ("generate would never stop at it (no logit produces it)" if field == "eos_token_id"
                      else "the embedding has no row for it")
            return (f"{source} sets '{field}' to {json.dumps(value)}: {beyond[0]} is outside the model's vocabulary "
                    f"[0, {vocab_size}) (vocab_size {vocab_size}), so {effect}; the usual cause is a tokenizer larger "
                    f"than the model's vocabulary, or another model's config. {fix.format(field=field)}")
    return None


def file_fix(name: str, more: str = "") -> str:
    """The fix of a refused file `name`: its field set to the tokenizer's id, or null (`more`: what else)."""
    return f"Fix {name}: set '{{field}}' to the id the tokenizer uses (e.g. tokenizer.eos_token_id), or null{more}."


def attribute_fix(owner: str, more: str = "") -> str:
    """The fix of a refused field of the object `owner` names (a config): the tokenizer's id, or None (`more`)."""
    return f"Set {owner}.{{field}} to the id the tokenizer uses (e.g. tokenizer.eos_token_id), or None{more}."
