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
    answer_text,
    build_arithmetic_tokenizer,
    make_arithmetic_dataset,
    make_arithmetic_splits,
    split_problem,
)
from easytrain.tasks.arithmetic import make_arithmetic_chat_splits, make_arithmetic_preference_splits

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


def test_problems_have_one_width_so_digits_of_equal_place_align():
    """Operands padded to the widest operand, the answer to one character more (a carry digit or a minus
    sign): every digit sits at a fixed offset from the '=', which a small model learns in fewer updates than
    variable widths (docs/benchmarks.md, "Embedded default job")."""
    for operators, max_operand in ((("+",), 99), (("+", "-"), 99), (("+",), 7), (("+", "-"), 250)):
        count = min(300, len(operators) * (max_operand + 1) ** 2)
        texts = list(make_arithmetic_dataset(count, seed=0, max_operand=max_operand, operators=operators)["text"])
        digits = len(str(max_operand))
        assert {len(t) for t in texts} == {3 * digits + 3}, (operators, max_operand, texts[:5])
        assert {t.index("=") for t in texts} == {2 * digits + 1}
    assert "3+7=10" in make_arithmetic_dataset(64, seed=0, max_operand=7)["text"]
    addition = set(make_arithmetic_dataset(10_000, seed=0)["text"])
    assert {"37+45=082", "07+05=012", "99+99=198", "00+00=000"} <= addition
    subtraction = set(make_arithmetic_dataset(20_000, seed=0, operators=("+", "-"))["text"])
    assert {"12-45=-33", "45-12=033", "00-99=-99", "05-07=-02"} <= subtraction


def test_answer_text_matches_the_problems_width():
    assert [answer_text(v, 99) for v in (82, 5, 198, -33, -2, 0)] == ["082", "005", "198", "-33", "-02", "000"]
    assert answer_text(10, 7) == "10" and answer_text(3, 7) == "03"


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
    assert split_problem("37+45=082") == ("37+45=", "082")
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
    text = "98+07=105"
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


def test_rejected_answers_are_near_misses_of_the_chosen_width():
    """A rejected answer of another width would let a preference model tell them apart by length alone."""
    pairs = make_arithmetic_preference_splits(300, 20, seed=0)["train"]
    for row in pairs:
        chosen, rejected = row["chosen"][0]["content"], row["rejected"][0]["content"]
        assert len(chosen) == len(rejected) == 3 and chosen != rejected
        assert abs(int(chosen) - int(rejected)) in (1, 2, 10)


def test_chat_questions_and_answers_keep_the_width():
    row = make_arithmetic_chat_splits(50, 5, seed=0)["train"][0]
    question, answer = row["messages"][0]["content"], row["messages"][1]["content"]
    assert re.fullmatch(r"\d\d\+\d\d", question) and re.fullmatch(r"\d{3}", answer)


@pytest.mark.parametrize("make", [make_arithmetic_splits, make_arithmetic_chat_splits,
                                  make_arithmetic_preference_splits])
def test_splits_are_built_once_per_process_and_each_caller_gets_its_own(make):
    """Every trainer on the embedded data asks for the same splits (the default DPO pairs take seconds to build);
    a caller that reformats or replaces a split must not change what the next caller gets."""
    first = make(40, 8, seed=3)
    table = first["train"].data.table
    first["train"].set_format("numpy")
    first["validation"] = first["validation"].select([0])
    second = make(40, 8, seed=3)
    assert second["train"].data.table is table, "built again"
    assert second["train"].format["type"] is None and len(second["validation"]) == 8
    assert make(40, 8, seed=4)["train"].data.table is not table  # another seed is other data
