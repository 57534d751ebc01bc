"""Every process of a multi-process run must prepare the same rows: each reads its share of the global batch by
row index, so other rows on one host mix other examples into every batch (a fresh run trains on them silently),
and a resume refused by some processes only would leave the others waiting forever in the next collective. Set-up
compares the processes' row counts and digests and every process refuses with the same error."""

import numpy as np
import pytest

from easytrain.errors import ArgumentError
from easytrain.trainers import data_agreement


def _fake_gather(*others: dict):
    """A `process_allgather` over this process's record and the records other processes would send."""
    def gather(record: np.ndarray) -> np.ndarray:
        rest = [data_agreement.encode(summary) for summary in others]
        return np.stack([record, *rest])
    return gather


TRAIN = {"train": (64, "a" * 32), "eval": None}


def test_the_same_rows_everywhere_pass():
    data_agreement.check_same_rows(TRAIN, {"train": "train_file", "eval": "validation_file"},
                                   gather=_fake_gather(TRAIN, TRAIN))


@pytest.mark.parametrize("other, shown", [({"train": (64, "b" * 32), "eval": None}, "digest bbbbbbbb"),
                                          ({"train": (63, "a" * 32), "eval": None}, "63 rows")])
def test_other_train_rows_in_one_process_are_named(other, shown):
    with pytest.raises(ArgumentError, match="train_file") as caught:
        data_agreement.check_same_rows(TRAIN, {"train": "train_file", "eval": "validation_file"},
                                       gather=_fake_gather(TRAIN, other))
    message = str(caught.value)
    assert "process 2" in message and "process 1" not in message.split("(")[0]
    assert "train rows" in message and shown in message and "same train_file" in message


def test_eval_rows_present_in_one_process_only_are_named():
    with_eval = {"train": (64, "a" * 32), "eval": (8, "c" * 32)}
    with pytest.raises(ArgumentError, match="dataset_eval") as caught:
        data_agreement.check_same_rows(with_eval, {"train": "dataset_train", "eval": "dataset_eval"},
                                       gather=_fake_gather(TRAIN))
    assert "eval rows" in str(caught.value) and "no eval rows" in str(caught.value)


def test_large_row_counts_and_missing_digests_survive_the_encoding():
    summary = {"train": (2**40 + 3, None), "eval": (5, "0123456789abcdef" * 2)}
    assert data_agreement.decode(data_agreement.encode(summary)) == summary


@pytest.mark.parametrize("values, given, expected", [
    (dict(train_file="t.txt", validation_file="v.txt"), (False, False),
     {"train": "train_file", "eval": "validation_file"}),
    (dict(dataset_name="d"), (False, True), {"train": "dataset_name", "eval": "dataset_eval"}),
    (dict(), (True, False), {"train": "dataset_train", "eval": "dataset_train"}),
    (dict(), (False, False), {"train": "seed", "eval": "seed"})])
def test_the_error_names_the_argument_the_rows_come_from(values, given, expected):
    from easytrain import TrainingArguments

    assert data_agreement.data_fields(TrainingArguments(**values), given) == expected
