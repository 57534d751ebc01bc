"""The embedded arithmetic task: seeded problems, disjoint splits, exact char tokenizer."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import re

import numpy as np
import pytest
from transformers import AutoTokenizer

from easytrain.data import DataError, tokenize_and_group
from easytrain.tasks import (
    build_arithmetic_tokenizer,
    make_arithmetic_dataset,
    make_arithmetic_splits,
    split_problem,
)

PROBLEM = re.compile(r"^(\d+)([+-])(\d+)=(-?\d+)$")


@pytest.fixture(scope="module")
def tokenizer():
    return build_arithmetic_tokenizer()


def _check_problem(text, max_operand):
    left, operator, right, answer = PROBLEM.match(text).groups()
    assert max(int(left), int(right)) <= max_operand
    expected = int(left) + int(right) if operator == "+" else int(left) - int(right)
    assert int(answer) == expected


def test_problems_are_correct_and_distinct():
    texts = make_arithmetic_dataset(2000, seed=0, max_operand=50, operators=("+", "-"))["text"]
    texts = list(texts)
    for text in texts:
        _check_problem(text, 50)
    assert len(set(texts)) == len(texts)
    assert {PROBLEM.match(t).group(2) for t in texts} == {"+", "-"}
    assert any(PROBLEM.match(t).group(4).startswith("-") for t in texts)


def test_problems_are_a_function_of_the_seed():
    first = list(make_arithmetic_dataset(100, seed=1)["text"])
    assert first == list(make_arithmetic_dataset(100, seed=1)["text"])
    assert first != list(make_arithmetic_dataset(100, seed=2)["text"])
    assert all(PROBLEM.match(t).group(2) == "+" for t in first)  # addition by default


def test_splits_are_disjoint_and_sized():
    splits = make_arithmetic_splits(3000, 400, seed=0)
    train, validation = set(splits["train"]["text"]), set(splits["validation"]["text"])
    assert (len(train), len(validation)) == (3000, 400)
    assert not train & validation


def test_every_problem_can_be_drawn():
    texts = make_arithmetic_dataset(16, seed=0, max_operand=3)["text"]
    assert len(set(texts)) == 16


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"num_examples": 17, "max_operand": 3}, "Asked for 17 distinct problems, but only 16"),
        ({"num_examples": 1, "operators": ("*",)}, r"`operators` must be .*\('\+', '-'\)"),
        ({"num_examples": 1, "operators": ()}, "`operators` must be distinct"),
        ({"num_examples": 1, "operators": ("+", "+")}, "`operators` must be distinct"),
        ({"num_examples": 1, "max_operand": -1}, "`max_operand` must be non-negative"),
    ],
)
def test_bad_requests(kwargs, match):
    with pytest.raises(DataError, match=match):
        make_arithmetic_dataset(seed=0, **kwargs)


def test_split_problem():
    assert split_problem("37+45=82") == ("37+45=", "82")
    assert split_problem("12-45=-33") == ("12-45=", "-33")
    with pytest.raises(DataError, match="no '='"):
        split_problem("37+45")


def test_tokenizer_round_trips_every_problem_without_unknowns(tokenizer):
    texts = list(make_arithmetic_dataset(500, seed=3, operators=("+", "-"))["text"])
    texts.append("1 + 2 = 3")
    for text in texts:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        assert len(ids) == len(text)  # one token per character
        assert tokenizer.unk_token_id not in ids
        assert tokenizer.decode(ids) == text


def test_tokenizer_special_tokens(tokenizer):
    assert (tokenizer.pad_token, tokenizer.bos_token, tokenizer.eos_token) == (
        "<pad>",
        "<bos>",
        "<eos>",
    )
    assert len({tokenizer.pad_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id}) == 3
    ids = tokenizer("1+1=2", add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    assert tokenizer.decode(ids, skip_special_tokens=True) == "1+1=2"
    assert len(tokenizer) == 18


def test_tokenizer_saves_and_loads(tmp_path, tokenizer):
    tokenizer.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    text = "98+7=105"
    assert loaded(text)["input_ids"] == tokenizer(text)["input_ids"]
    assert loaded.decode(loaded(text)["input_ids"]) == text
    assert (loaded.eos_token_id, loaded.pad_token_id) == (
        tokenizer.eos_token_id,
        tokenizer.pad_token_id,
    )


def test_task_data_feeds_the_lm_pipeline(tokenizer):
    splits = make_arithmetic_splits(400, 50, seed=0)
    blocks = tokenize_and_group(splits["train"], tokenizer, max_length=32)
    array = np.asarray(blocks.with_format("numpy")["input_ids"])
    assert array.shape[1] == 33 and len(array) > 50
    for block in array:
        for line in tokenizer.decode(block.tolist()).split("<eos>")[1:-1]:  # whole problems
            _check_problem(line, 99)
