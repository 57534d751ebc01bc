"""Prompt-completion strings and DPO string pairs are tokenised fast (no joined text for a byte-level BPE that adds
nothing, ``TextCoder.joins_losslessly``) with exactly the ids of the slow path: each text
through ``tokenizer(...)``, the joined text always tokenised, and apart kept where its ids or their decoding (no
clean-up) equal the joined text's. Pinned on every tokenizer kind the suite builds, on awkward rows."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import functools

import pytest
from chat_fixtures import SPECS, build_chat_tokenizer
from test_sft_prompt_completion_join import sentencepiece_tokenizer
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from easytrain.data import text_coder
from easytrain.data.preference_tokens import joined_pair_tokens, string_pair_tokens
from easytrain.data.prompt_completion import completion_tokens, prompt_completion_tokens
from easytrain.tasks.arithmetic import build_arithmetic_chat_tokenizer

_CORPUS = ["What is two plus two? Two plus two is four.", "Translate hello into French: bonjour, au revoir.",
           "The quick brown fox jumps over the lazy dog; café, naïve, résumé.", "Line one\nline two\ttab  two"] * 20
LLAMA3_SPLIT = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s+"


@functools.cache
def _trained(kind: str) -> str:
    """A backend of ``kind`` trained on ``_CORPUS``, serialised."""
    if kind == "wordpiece":  # BERT's: lower-cases, strips accents, drops whitespace
        backend = Tokenizer(models.WordPiece(unk_token="[UNK]"))
        backend.normalizer = normalizers.BertNormalizer(lowercase=True)
        backend.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        backend.decoder = decoders.WordPiece()
        trainer = trainers.WordPieceTrainer(vocab_size=300, special_tokens=["[UNK]", "[CLS]", "[SEP]", "[PAD]"],
                                            show_progress=False)
    else:
        backend = Tokenizer(models.BPE())
        backend.pre_tokenizer = {
            "llama3_split": pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(LLAMA3_SPLIT), "isolated"),
                                                     pre_tokenizers.ByteLevel(add_prefix_space=False,
                                                                              use_regex=False)]),
            "prefix_space": pre_tokenizers.ByteLevel(add_prefix_space=True),
            "nfc": pre_tokenizers.ByteLevel(add_prefix_space=False)}[kind]
        backend.normalizer = normalizers.NFC() if kind == "nfc" else None  # Qwen2's
        backend.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<s>", "</s>"], show_progress=False,
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    backend.train_from_iterator(_CORPUS, trainer)
    return backend.to_str()


def trained(kind: str) -> PreTrainedTokenizerFast:
    specials = ({"unk_token": "[UNK]", "bos_token": "[CLS]", "eos_token": "[SEP]", "pad_token": "[PAD]"}
                if kind == "wordpiece" else {"bos_token": "<s>", "eos_token": "</s>", "pad_token": "</s>"})
    return PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(_trained(kind)), **specials)


def edited(base: str, edit) -> PreTrainedTokenizerFast:
    tok = build_chat_tokenizer(base)
    edit(tok)
    return tok


class OwnCall(PreTrainedTokenizerFast):
    """A tokenizer class with its own ``_encode_plus`` (a pass-through): its calls give the ids."""

    def _encode_plus(self, *args, **kwargs):
        return super()._encode_plus(*args, **kwargs)


KINDS = {
    **{f"byte_level_{name}": functools.partial(build_chat_tokenizer, name) for name in SPECS},
    "llama_legacy": functools.partial(sentencepiece_tokenizer, "llama_legacy"),
    "metaspace_first": functools.partial(sentencepiece_tokenizer, "metaspace_first"),
    **{name: functools.partial(trained, name) for name in ("wordpiece", "llama3_split", "prefix_space", "nfc")},
    "character_level": build_arithmetic_chat_tokenizer,
    "split_special_tokens": functools.partial(edited, "chatml", lambda tok: tok(
        "x", add_special_tokens=False, split_special_tokens=True) and setattr(tok, "split_special_tokens", True)),
    "stripping_added_token": functools.partial(edited, "chatml", lambda tok: tok.add_special_tokens(
        {"additional_special_tokens": [AddedToken("<|tool|>", lstrip=True, rstrip=True, special=True)]})),
    "promoted_byte_token": functools.partial(edited, "chatml", lambda tok: tok.add_tokens(["é"])),
    "many_added_tokens": functools.partial(edited, "chatml", lambda tok: tok.add_special_tokens(
        {"additional_special_tokens": [f"<|reserved_{i}|>" for i in range(text_coder.ADDED_TOKENS_CHECKED + 8)]})),
    "truncating_backend": functools.partial(edited, "chatml", lambda tok: tok.backend_tokenizer.enable_truncation(3)),
    "own_call_class": lambda: OwnCall(tokenizer_object=Tokenizer.from_str(
        build_chat_tokenizer("chatml").backend_tokenizer.to_str()), eos_token="<|im_end|>"),
}
#: Whether ``TextCoder.joins_losslessly`` holds for a plain row: the byte-level BPEs that add nothing.
LOSSLESS = {*(f"byte_level_{name}" for name in SPECS), "llama3_split", "split_special_tokens", "stripping_added_token",
            "promoted_byte_token", "truncating_backend", "own_call_class"}

ROWS = [
    ("What is two plus two? ", "four"), ("What is two plus two? ", " Four."), ("What is two plus two?", "four"),
    ("Translate hello into French:", " bonjour"), ("Translate hello into French:", "bonjour"),
    ("Question:\n", "\nAnswer:  two  spaces\t"), ("", "no prompt"), ("What is two plus two?", ""),
    ("Un café ", "naïve résumé 東京 顿 🙂"), ("e", "\u0301 accent combined"), ("caf", "é"), ("Ünïcödé ", "ß"),
    ("Say <|im_end|> now", " ok<|im_end|>"), ("Stop at <|im_", "end|> here"), ("Call <|tool|>", "   then"),
    ("[INST] hi [/INST]", " sure</s>"), ("<start_of_turn>user\nhi", "<end_of_turn>"), ("<s>", "</s> <s>"),
    ("control \x01", "\x00 and \ufffd"), ("12+34=", "046"),
]
IDS = [repr(p[-8:] + "|" + c[:8]) for p, c in ROWS]


def slow_sft(tok, prompt: str, completion: str):
    """The slow path (before the fast one): every text through the tokenizer's own calls, the joined one too."""
    pieces, joined = [_encoded(tok, prompt), _encoded(tok, completion)], _encoded(tok, prompt + completion)
    if _reads_as_joined(tok, pieces, joined):
        return pieces[0] + pieces[1], [0] * len(pieces[0]) + [1] * len(pieces[1])
    return completion_tokens(tok, prompt + completion, len(prompt))


def slow_pair(tok, prompt: str, chosen: str, rejected: str):
    ids = [_encoded(tok, text) for text in (prompt, chosen, rejected)]
    if all(_reads_as_joined(tok, [ids[0], side], _encoded(tok, prompt + text))
           for side, text in ((ids[1], chosen), (ids[2], rejected))):
        return ids[0], (ids[1], [1] * len(ids[1])), (ids[2], [1] * len(ids[2]))
    return joined_pair_tokens(tok, prompt, chosen, rejected)


def _encoded(tok, text: str) -> list[int]:
    return tok(text, add_special_tokens=False)["input_ids"]


def _reads_as_joined(tok, pieces, joined) -> bool:
    apart = pieces[0] + pieces[1]
    decoded = [tok.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)
               for ids in (apart, joined)]
    return apart == joined or decoded[0] == decoded[1]


@pytest.mark.parametrize("kind", KINDS)
def test_prompt_completion_ids_are_the_slow_paths(kind):
    tok = KINDS[kind]()
    for prompt, completion in ROWS:
        fast = prompt_completion_tokens(tok, prompt, completion)
        assert fast == slow_sft(tok, prompt, completion), (prompt, completion, tok.convert_ids_to_tokens(fast[0]))


@pytest.mark.parametrize("kind", KINDS)
def test_pair_ids_are_the_slow_paths(kind):
    tok = KINDS[kind]()
    for (prompt, chosen), (_, rejected) in zip(ROWS, ROWS[1:] + ROWS[:1]):
        fast = string_pair_tokens(tok, prompt, chosen, rejected)
        assert fast == slow_pair(tok, prompt, chosen, rejected), (prompt, chosen, rejected)


@pytest.mark.parametrize("kind", KINDS)
def test_the_joined_text_is_skipped_only_for_byte_level_bpe_that_adds_nothing(kind):
    """Not vacuous: the byte-level fixtures do take the fast path; SentencePiece's '▁', WordPiece's normalizer, a
    prefix space, NFC and a character-level WordLevel do not."""
    coder = text_coder.TextCoder(KINDS[kind]())
    assert coder.joins_losslessly("What is two plus two? four") is (kind in LOSSLESS)
    assert not coder.joins_losslessly(f"What is {coder.tokenizer.eos_token} four")  # an added token's text


@pytest.mark.parametrize("row", ROWS, ids=IDS)
def test_an_added_token_edited_in_place_after_use_is_seen(row):
    """``add_special_tokens`` of an existing token with ``lstrip``/``rstrip`` keeps the vocabulary's size: the
    edited flags must count from the next row on, as they do for the slow path."""
    tok = build_chat_tokenizer("chatml")
    prompt_completion_tokens(tok, *row)
    tok.add_special_tokens({"eos_token": AddedToken("<|im_end|>", lstrip=True, rstrip=True, special=True)})
    for prompt, completion in (row, ("Say <|im_end|>", "  x"), ("Say  ", "<|im_end|> x")):
        assert prompt_completion_tokens(tok, prompt, completion) == slow_sft(tok, prompt, completion)
    apart = _encoded(tok, "Say <|im_end|>") + _encoded(tok, "  x")
    assert slow_sft(tok, "Say <|im_end|>", "  x")[0] != apart  # stripped: the check takes the joined text


def test_the_backend_decodes_an_added_tokens_id_through_its_decoder():
    """``joins_losslessly`` counts a model token made an added one (``add_tokens(['é'])``, the byte 0xE9) as its
    byte, which holds while tokenizers decodes added ids through the decoder, as 0.23 does."""
    tok = KINDS["promoted_byte_token"]()
    promoted = tok.convert_tokens_to_ids("é")
    assert tok.backend_tokenizer.decode([promoted]) == decoders.ByteLevel().decode(["é"]) == "\ufffd"
    assert text_coder.TextCoder(tok).joins_losslessly("顿") and not text_coder.TextCoder(
        tok).joins_losslessly("é")
