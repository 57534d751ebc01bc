"""tokenize_and_group and lm_collate: documents -> EOS-separated fixed-size blocks."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import json

import datasets
import numpy as np
import pytest
from tokenizers import Tokenizer, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

from easytrain.data import (
    DataError,
    lm_collate,
    lm_collate_rows,
    load_text_datasets,
    tokenize_and_group,
)
from easytrain.tasks import build_arithmetic_tokenizer

CORPUS = [
    f"the {animal} sat on the {thing} number {i}"
    for i, (animal, thing) in enumerate(
        [("cat", "mat"), ("dog", "log"), ("bird", "perch"), ("fox", "box")] * 30
    )
]


@pytest.fixture(scope="module")
def char_tokenizer():
    return build_arithmetic_tokenizer()


@pytest.fixture(scope="module")
def bpe_tokenizer():
    """A small BPE tokenizer whose post-processor adds BOS, as many real ones do."""
    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    trainer = trainers.BpeTrainer(vocab_size=200, special_tokens=["<pad>", "<s>", "</s>", "<unk>"])
    tokenizer.train_from_iterator(CORPUS, trainer)
    tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", tokenizer.token_to_id("<s>"))]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
    )


def _stream(tokenizer, texts):
    """The expected token stream: each document's ids followed by EOS."""
    ids = tokenizer(texts, add_special_tokens=False)["input_ids"]
    return [token for row in ids for token in (*row, tokenizer.eos_token_id)]


def test_blocks_are_the_eos_separated_stream_cut_into_equal_pieces(bpe_tokenizer):
    texts = CORPUS[:40]  # few enough blocks to be grouped in one batch: one tail dropped
    data = datasets.Dataset.from_dict({"text": texts, "source": ["web"] * len(texts)})
    blocks = tokenize_and_group(data, bpe_tokenizer, max_length=15)
    stream = _stream(bpe_tokenizer, texts)
    assert blocks.column_names == ["input_ids"]
    array = np.asarray(blocks.with_format("numpy")["input_ids"])
    assert array.shape == (len(stream) // 16, 16)
    assert array.ravel().tolist() == stream[: array.size]
    assert bpe_tokenizer.bos_token_id not in array


def test_custom_text_column_and_no_eos(char_tokenizer):
    data = datasets.Dataset.from_dict({"body": ["12+3=15", "1+1=2"]})
    blocks = tokenize_and_group(
        data, char_tokenizer, text_column="body", max_length=3, append_eos=False
    )
    flat = np.asarray(blocks.with_format("numpy")["input_ids"]).ravel().tolist()
    assert char_tokenizer.decode(flat) == "12+3=151+1=2"
    assert char_tokenizer.eos_token_id not in flat


def test_empty_documents_add_no_tokens(char_tokenizer):
    data = datasets.Dataset.from_dict({"text": ["1+1=2", "", None, "2+2=4"]})
    blocks = tokenize_and_group(data, char_tokenizer, max_length=11)
    assert char_tokenizer.decode(blocks[0]["input_ids"]) == "1+1=2<eos>2+2=4<eos>"


def test_many_short_documents_lose_less_than_one_block(char_tokenizer):
    """Grouping batches are sized from the data, so long blocks still fill up."""
    data = datasets.Dataset.from_dict({"text": ["1+1=2"] * 5000})  # 6 tokens each
    blocks = tokenize_and_group(data, char_tokenizer, max_length=1023)
    assert len(blocks) == 5000 * 6 // 1024


def test_short_documents_beside_long_ones_all_reach_the_blocks(char_tokenizer):
    """Grouping batches full of short documents once held under one block each and dropped it: at most one
    partial block (the stream's tail) may be lost, wherever the short documents are."""
    texts = ["1"] * 3000 + ["1+1=2" * 50] * 200 + ["7"] * 500  # 2 and 251 tokens with the EOS
    blocks = tokenize_and_group(datasets.Dataset.from_dict({"text": texts}), char_tokenizer, max_length=127)
    stream = _stream(char_tokenizer, texts)
    flat = np.asarray(blocks.with_format("numpy")["input_ids"]).ravel().tolist()
    assert len(stream) - len(flat) < 128
    assert flat == stream[: len(flat)]


def test_worker_processes_give_the_same_blocks(char_tokenizer):
    texts = [f"{i}+{i}={2 * i}" for i in range(400)] + ["9"] * 300 + ["1+1=2" * 40] * 20
    data = datasets.Dataset.from_dict({"text": texts})
    serial = tokenize_and_group(data, char_tokenizer, max_length=31)
    parallel = tokenize_and_group(data, char_tokenizer, max_length=31, num_proc=2)
    assert parallel["input_ids"][:] == serial["input_ids"][:]


class _CountingTokenizer(PreTrainedTokenizerFast):
    """Counts the documents it is asked to tokenise (in this process: no `num_proc`)."""

    documents: list[int] = []

    def __call__(self, texts, *args, **kwargs):
        type(self).documents.append(len(texts))
        return super().__call__(texts, *args, **kwargs)


def _counting(tokenizer) -> _CountingTokenizer:
    _CountingTokenizer.documents = []
    return _CountingTokenizer(tokenizer_object=tokenizer.backend_tokenizer, eos_token=tokenizer.eos_token,
                              pad_token=tokenizer.pad_token)


@pytest.fixture(scope="module")
def large_corpus(char_tokenizer) -> tuple[list[str], datasets.Dataset, np.ndarray]:
    """20050 documents, and every block of 32 tokens they give without a limit."""
    texts = [f"{i}+{i % 97}={i + i % 97}" for i in range(20000)] + ["1+1=2" * 30] * 50
    data = datasets.Dataset.from_dict({"text": texts})
    return texts, data, np.asarray(tokenize_and_group(data, char_tokenizer, max_length=31)
                                   .with_format("numpy")["input_ids"])


@pytest.mark.parametrize("max_blocks", [1, 40, 500])
def test_a_block_limit_gives_the_first_blocks_and_tokenises_only_what_they_need(char_tokenizer, large_corpus,
                                                                                max_blocks):
    """A run that trains on `max_train_samples` blocks of a large corpus reads the documents those blocks hold
    (and a bounded margin), not the whole corpus; its blocks are the unlimited run's first ones."""
    texts, data, everything = large_corpus
    tokenizer = _counting(char_tokenizer)
    limited = np.asarray(tokenize_and_group(data, tokenizer, max_length=31, max_blocks=max_blocks)
                         .with_format("numpy")["input_ids"])
    assert len(limited) >= max_blocks
    np.testing.assert_array_equal(limited[:max_blocks], everything[:max_blocks])
    needed = np.searchsorted(np.cumsum([len(t) + 1 for t in texts]), max_blocks * 32) + 1
    assert needed <= sum(tokenizer.documents) <= max(2 * needed, 1024), (needed, tokenizer.documents)


def test_the_trainers_blocks_under_max_train_samples_tokenise_a_prefix(tmp_path, char_tokenizer):
    from easytrain import TrainingArguments
    from easytrain.trainers.lm_blocks import lm_eval_blocks

    args = TrainingArguments(output_dir=str(tmp_path), max_length=15, max_train_samples=3)
    data = datasets.Dataset.from_dict({"text": [f"{i}-1={i - 1}" for i in range(10000)]})
    tokenizer = _counting(char_tokenizer)
    blocks = lm_eval_blocks(args, tokenizer, data, args.max_train_samples, "train")
    assert len(blocks) == 3 and sum(tokenizer.documents) <= 1024
    everything = tokenize_and_group(data, char_tokenizer, max_length=15)
    np.testing.assert_array_equal(blocks["input_ids"], np.asarray(everything["input_ids"][:3]))


def test_a_block_limit_beyond_the_data_gives_every_block(char_tokenizer):
    texts = [f"{i}*3={3 * i}" for i in range(3000)]
    data = datasets.Dataset.from_dict({"text": texts})
    everything = tokenize_and_group(data, char_tokenizer, max_length=15)
    limited = tokenize_and_group(data, char_tokenizer, max_length=15, max_blocks=10**6)
    assert limited["input_ids"][:] == everything["input_ids"][:]
    parallel = tokenize_and_group(data, char_tokenizer, max_length=15, max_blocks=len(everything) - 1, num_proc=2)
    assert parallel["input_ids"][: len(everything) - 1] == everything["input_ids"][: len(everything) - 1]
    with pytest.raises(DataError, match=r"has 12 tokens.*one block needs 17"):
        tokenize_and_group(datasets.Dataset.from_dict({"text": ["1+1=2", "3+4=7"]}), char_tokenizer, max_length=16,
                           max_blocks=4)


@pytest.mark.parametrize("max_blocks", [None, 4])
def test_a_split_without_rows_says_it_has_no_tokens(char_tokenizer, max_blocks):
    with pytest.raises(DataError, match=r"has 0 tokens.*one block needs 12"):
        tokenize_and_group(datasets.Dataset.from_dict({"text": []}, features=datasets.Features(
            {"text": datasets.Value("string")})), char_tokenizer, max_length=11, max_blocks=max_blocks)


@pytest.mark.parametrize("max_blocks", [None, 4])
def test_a_first_thousand_empty_documents_before_text_give_the_texts_blocks(char_tokenizer, max_blocks):
    """`datasets` infers a column's type from the first batch it writes: one of only empty documents had no token
    to type its rows by, and the next batch's integers could not be cast to it."""
    texts = [""] * 1000 + [None] * 500 + ["1+1=2"] * 100
    blocks = tokenize_and_group(datasets.Dataset.from_dict({"text": texts}), char_tokenizer, max_length=11,
                                max_blocks=max_blocks)
    assert len(blocks) == 100 * 6 // 12 and char_tokenizer.decode(blocks[0]["input_ids"]) == "1+1=2<eos>1+1=2<eos>"


def test_token_ids_are_stored_as_int32(char_tokenizer):
    """`datasets` stores an inferred `input_ids` column as int32; the columns given to `map` keep that (int64 would
    double a large corpus's cached tokens on disk and in Arrow memory)."""
    blocks = tokenize_and_group(datasets.Dataset.from_dict({"text": ["1+1=2"] * 20}), char_tokenizer, max_length=7)
    assert blocks.features["input_ids"].feature.dtype == "int32"


def test_missing_text_column_lists_the_columns(char_tokenizer):
    data = datasets.Dataset.from_dict({"content": ["a"], "id": [1]})
    with pytest.raises(DataError, match=r"'text' is not in .*content, id.*set `text_column`"):
        tokenize_and_group(data, char_tokenizer, max_length=4)


@pytest.mark.parametrize(("values", "kind"), [([["1+1=2", "3"]] * 4, "lists"), ([{"a": "1+1=2"}] * 4, "dicts")])
def test_text_column_of_lists_or_dicts_is_refused(char_tokenizer, values, kind):
    data = datasets.Dataset.from_dict({"text": values})
    with pytest.raises(DataError, match=rf"'text' holds {kind} \(.*\), not strings.*format.*`text_column`"):
        tokenize_and_group(data, char_tokenizer, max_length=4)


def test_too_little_data_says_how_much_is_needed(char_tokenizer):
    data = datasets.Dataset.from_dict({"text": ["1+1=2", "3+4=7"]})
    with pytest.raises(DataError, match=r"has 12 tokens.*one block needs 17 \(max_length \+ 1\)"):
        tokenize_and_group(data, char_tokenizer, max_length=16)


def test_tokenizer_without_eos(bpe_tokenizer):
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe_tokenizer.backend_tokenizer)
    data = datasets.Dataset.from_dict({"text": CORPUS})
    with pytest.raises(DataError, match=r"no EOS token.*`append_eos=False`"):
        tokenize_and_group(data, tokenizer, max_length=8)
    assert len(tokenize_and_group(data, tokenizer, max_length=8, append_eos=False)) > 0


def test_max_length_must_be_positive(char_tokenizer):
    data = datasets.Dataset.from_dict({"text": ["1+1=2"]})
    with pytest.raises(DataError, match="`max_length` must be at least 1"):
        tokenize_and_group(data, char_tokenizer, max_length=0)


def test_tokenised_blocks_are_cached_between_runs(tmp_path, char_tokenizer):
    train_file = tmp_path / "train.jsonl"
    lines = (json.dumps({"text": f"{i}+1={i + 1}"}) + "\n" for i in range(300))
    train_file.write_text("".join(lines))
    split = load_text_datasets(
        train_file=train_file, validation_split_percentage=0, cache_dir=tmp_path / "cache"
    )["train"]
    first = tokenize_and_group(split, char_tokenizer, max_length=31)
    files = [entry["filename"] for entry in first.cache_files]
    mtimes = [os.path.getmtime(name) for name in files]
    second = tokenize_and_group(split, build_arithmetic_tokenizer(), max_length=31)
    assert [entry["filename"] for entry in second.cache_files] == files
    assert [os.path.getmtime(name) for name in files] == mtimes
    third = tokenize_and_group(split, char_tokenizer, max_length=15)
    assert [entry["filename"] for entry in third.cache_files] != files


def test_lm_collate_shifts_blocks_into_the_batch_contract():
    blocks = np.arange(12).reshape(2, 6)
    batch = lm_collate(blocks, np.array([7, 3]))
    np.testing.assert_array_equal(batch["input_ids"], blocks[:, :-1])
    np.testing.assert_array_equal(batch["targets"], blocks[:, 1:])
    assert {k: (v.dtype.name, v.shape) for k, v in batch.items()} == {
        "input_ids": ("int32", (2, 5)),
        "targets": ("int32", (2, 5)),
        "loss_mask": ("float32", (2, 5)),
        "example_id": ("int32", (2,)),
    }
    assert batch["loss_mask"].all()
    assert batch["example_id"].tolist() == [7, 3]


def test_lm_collate_rows_uses_the_input_ids_column():
    rows = {"input_ids": np.ones((2, 4), np.int64), "other": np.zeros(2)}
    assert lm_collate_rows(rows, np.arange(2))["input_ids"].shape == (2, 3)
    with pytest.raises(DataError, match=r"no 'input_ids' column.*other"):
        lm_collate_rows({"other": np.zeros(2)}, np.arange(2))


def test_lm_collate_rejects_rows_and_bad_shapes():
    with pytest.raises(DataError, match="`collate=lm_collate_rows`"):
        lm_collate({"input_ids": np.ones((2, 4))}, np.arange(2))
    with pytest.raises(DataError, match=r"\[N, T \+ 1\]"):
        lm_collate(np.ones((2, 1)), np.arange(2))
