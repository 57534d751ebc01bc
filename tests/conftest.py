"""Shared fixtures. Tests never touch the network and run on the CPU."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import pytest  # noqa: E402

CORPUS = (
    "The quick brown fox jumps over the lazy dog. A journey of a thousand miles begins with one step. "
    "All that glitters is not gold. Where there is a will there is a way. Practice makes perfect. "
    "Knowledge is power. Time flies like an arrow; fruit flies like a banana. "
) * 4


@pytest.fixture(scope="session")
def text_lines() -> list[str]:
    sentences = [s.strip() + "." for s in CORPUS.split(".") if s.strip()]
    return sentences * 3


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory, text_lines):
    """A byte-level BPE tokenizer trained on a few KB of local text, saved in Hugging Face format."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<pad>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(text_lines, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    path = tmp_path_factory.mktemp("tokenizer")
    fast.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="session")
def tokenizer(tokenizer_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tokenizer_dir)
