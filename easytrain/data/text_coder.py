"""A tokenizer's encode and decode for prompt-completion strings, and where the joined text need not be tokenised.

``reads_as_joined`` (``prompt_completion``) compares a row's texts tokenised apart with the joined text: an encode and
two decodes a row, which doubled the cost of tokenising such rows. For a byte-level BPE that adds nothing the answer
is known without them (``TextCoder.joins_losslessly``): the ids are the same, in less time.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Sequence
from typing import Any

from tokenizers.models import BPE
from transformers import PreTrainedTokenizerBase

from easytrain.data.special_tokens import encode_text

#: Past this many added tokens, looking each up in every row costs more than the joined encode it would save.
ADDED_TOKENS_CHECKED = 32


class TextCoder:
    """One tokenizer's ``encode`` (``encode_text`` of each text) and ``decode`` (special tokens kept, no clean-up,
    which would read 'two ?' as 'two?')."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase) -> None:
        self.tokenizer = tokenizer

    def encode(self, texts: Sequence[str]) -> list[list[int]]:
        return [encode_text(self.tokenizer, text) for text in texts]

    def decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=False, clean_up_tokenization_spaces=False)

    def joins_losslessly(self, text: str) -> bool:
        """Whether every split of ``text`` in two, each part tokenised alone, decodes as ``text`` tokenised whole,
        so ``reads_as_joined`` holds: then the joined encode and both decodes can be skipped, with their verdict.

        True for a byte-level BPE that adds nothing (GPT-2's, Llama 3's): no normalizer; pre-tokenizers that only
        split the text (``Split`` not removing, ``Digits``) and one ``ByteLevel`` without a prefix space, so each
        token stands for its bytes; a BPE with no unknown token, byte fallback, dropout or word affixes, so a byte
        missing from its vocabulary is dropped wherever it stands; the ``ByteLevel`` decoder, which joins the
        tokens' bytes before reading them as UTF-8 (an added token's id too, a model token made an added one
        included: tokenizers 0.23 decodes every id through the decoder). Either side's bytes are then the text's,
        less the same missing bytes, so they decode alike. Added tokens matched in the text would break that (one
        that strips the spaces beside it, one whose content does not decode to itself, one split across the two
        parts), so ``text`` must hold none of their contents: looked up for every row, since they change in place
        (``add_special_tokens`` of an existing token with ``lstrip=True``) without the vocabulary size showing it.
        Everything else (SentencePiece's '▁', WordPiece's normalizer, NFC, a slow tokenizer, many added tokens)
        answers False, and the caller compares.
        """
        backend = getattr(self.tokenizer, "backend_tokenizer", None) if self.tokenizer.is_fast else None
        if backend is None or not _byte_level(backend):
            return False
        added = backend.get_added_tokens_decoder()
        return len(added) <= ADDED_TOKENS_CHECKED and not any(token.content in text for token in added.values())


def _byte_level(backend: Any) -> bool:
    """The backend's pipeline as ``TextCoder.joins_losslessly`` needs it, added tokens aside."""
    if backend.normalizer is not None or backend.pre_tokenizer is None or backend.decoder is None:
        return False
    if not (_splits_then_byte_level(backend.pre_tokenizer.__getstate__())
            and _byte_level_decoder(backend.decoder.__getstate__())):
        return False
    model = backend.model
    return (isinstance(model, BPE) and not model.dropout and model.unk_token is None
            and not model.byte_fallback and not model.continuing_subword_prefix and not model.end_of_word_suffix)


@functools.lru_cache(maxsize=64)
def _splits_then_byte_level(state: bytes) -> bool:
    """Whether a pre-tokenizer (as serialised) only splits the text, and maps it to bytes once, adding nothing."""
    root = json.loads(state)
    steps = root["pretokenizers"] if root["type"] == "Sequence" else [root]
    byte_level = [step for step in steps if step["type"] == "ByteLevel"]
    splits_only = all(step["type"] == "Digits" or (step["type"] == "Split" and step["behavior"] != "Removed")
                      for step in steps if step["type"] != "ByteLevel")
    return splits_only and len(byte_level) == 1 and byte_level[0].get("add_prefix_space") is False


@functools.lru_cache(maxsize=64)
def _byte_level_decoder(state: bytes) -> bool:
    """Whether a decoder (as serialised) is ``ByteLevel`` alone: the tokens' bytes, joined, read as UTF-8 (its
    ``add_prefix_space`` is for encoding; it strips nothing)."""
    return json.loads(state)["type"] == "ByteLevel"
