"""Prompt-completion strings whose apart tokenisation does not read as the joined text are tokenised as one text,
and the completion's tokens are found from character offsets: tokenising prompt and completion apart gives a
SentencePiece-style tokenizer (one that prepends '▁' to every text it encodes) a second '▁' at the boundary, so the
model would train on 'French:  bonjour' for the documented {"prompt": "...French:", "completion": " bonjour"}.
Where apart is faithful (byte-level BPE), the rows stay tokenised apart (tests/test_tokenise_apart_when_faithful.py)."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import functools

import pytest
from chat_fixtures import MARKED, build_chat_tokenizer
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

from easytrain.data.sft import SFTDataOptions, tokenize_example

_CORPUS = ["Translate hello into French: bonjour", "Translate goodbye into French: au revoir",
           "What is two plus two? four", "The quick brown fox jumps over the lazy dog"] * 20


@functools.cache
def _sentencepiece_backend(kind: str) -> str:
    """A BPE whose pieces start at words (as SentencePiece's do), then given the normalizer (Llama's legacy
    converter: Prepend('▁') + Replace(' ', '▁')) or the Metaspace pre-tokenizer (prepend_scheme 'first')."""
    bpe = Tokenizer(models.BPE(byte_fallback=True, unk_token="<unk>"))
    bpe.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always", split=True)
    bpe.train_from_iterator(_CORPUS, trainers.BpeTrainer(vocab_size=200, special_tokens=["<unk>", "<s>", "</s>"],
                                                         show_progress=False))
    if kind == "llama_legacy":
        bpe.pre_tokenizer = None
        bpe.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
        bpe.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                         decoders.Strip(" ", 1, 0)])
    else:
        bpe.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=False)
        bpe.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="first", split=False)
    return bpe.to_str()


def sentencepiece_tokenizer(kind: str) -> PreTrainedTokenizerFast:
    return PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(_sentencepiece_backend(kind)), bos_token="<s>",
                                   eos_token="</s>", unk_token="<unk>", pad_token="</s>")


def pieces_text(tok, ids) -> str:
    """The text of ``ids`` with every '▁' a space (decoders strip a leading one)."""
    return "".join(tok.convert_ids_to_tokens(ids)).replace("▁", " ")


def supervised(out) -> list[int]:
    return [token for token, bit in zip(out.input_ids, out.loss_mask, strict=True) if bit]


@pytest.mark.parametrize("kind", ["llama_legacy", "metaspace_first"])
@pytest.mark.parametrize("completion", [" bonjour", "bonjour"])
def test_sentencepiece_prompt_completion_is_the_joined_text(kind, completion):
    tok = sentencepiece_tokenizer(kind)
    prompt = "Translate hello into French:"
    out = tokenize_example({"prompt": prompt, "completion": completion}, tok, SFTDataOptions(), "prompt_completion")
    joined = tok(prompt + completion, add_special_tokens=False)["input_ids"]
    assert out.input_ids == [tok.bos_token_id] + joined + [tok.eos_token_id], tok.convert_ids_to_tokens(out.input_ids)
    *answer, eos = supervised(out)
    assert eos == tok.eos_token_id and pieces_text(tok, answer) == completion
    everything = tokenize_example({"prompt": prompt, "completion": completion}, tok,
                                  SFTDataOptions(completion_only_loss=False), "prompt_completion")
    assert everything.input_ids == out.input_ids and everything.loss_mask == [0] + [1] * (len(out.input_ids) - 1)


def test_a_token_across_the_boundary_is_supervised():
    """'two? ' + 'four' is read as '▁two?', '▁four': the token holding the prompt's last space and the completion is
    the completion's, since the model must produce it."""
    tok = sentencepiece_tokenizer("llama_legacy")
    out = tokenize_example({"prompt": "What is two plus two? ", "completion": "four"}, tok, SFTDataOptions(),
                           "prompt_completion")
    assert tok.convert_ids_to_tokens(supervised(out)) == ["▁four", "</s>"]


@pytest.mark.parametrize("name", MARKED)
@pytest.mark.parametrize("trim_offsets", [False, True])
def test_byte_level_ids_are_unchanged_where_prompt_and_completion_split_cleanly(name, trim_offsets):
    tok = build_chat_tokenizer(name)
    if trim_offsets:  # GPT-2-like post-processor: the offsets are read untrimmed
        tok.backend_tokenizer.post_processor = processors.ByteLevel(trim_offsets=True)
    prompt, completion = "What is two plus two?", " Two plus two is four."
    out = tokenize_example({"prompt": prompt, "completion": completion}, tok, SFTDataOptions(), "prompt_completion")
    bos = [] if tok.bos_token_id is None else [tok.bos_token_id]
    prompt_ids = bos + tok(prompt, add_special_tokens=False)["input_ids"]
    completion_ids = tok(completion, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    assert out.input_ids == prompt_ids + completion_ids
    assert out.loss_mask == [0] * len(prompt_ids) + [1] * len(completion_ids)


def test_without_offsets_the_completion_starts_where_the_prompt_tokens_stop(monkeypatch):
    """A slow tokenizer gives no offsets: the tokens from the first that differs from the prompt's own are the
    completion's (the same boundary, found by comparing ids)."""
    from easytrain.data import prompt_completion

    tok = sentencepiece_tokenizer("llama_legacy")
    expected = {(p, c): tokenize_example({"prompt": p, "completion": c}, tok, SFTDataOptions(), "prompt_completion")
                for p, c in [("Translate hello into French:", " bonjour"), ("What is two plus two? ", "four")]}

    def no_offsets(tokenizer, text):
        raise NotImplementedError("slow tokenizer")

    monkeypatch.setattr(prompt_completion, "encode_with_offsets", no_offsets)
    for (p, c), out in expected.items():
        assert tokenize_example({"prompt": p, "completion": c}, tok, SFTDataOptions(), "prompt_completion") == out
