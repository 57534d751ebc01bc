"""Token ids a `collate` returns, checked on the host before the batch reaches the device: a custom collate can
write an id the model has no embedding for (-100 as an ignore marker, an id past the vocabulary), which the
compiled gather would wrap or clamp silently."""

import grain
import numpy as np
import pytest

from easytrain.data import EvalBatches, TrainBatches
from easytrain.data.token_range import TokenRangeError

VOCAB = 50
NO_PREFETCH = grain.ReadOptions(num_threads=0, prefetch_buffer_size=0)


def rows(num_rows: int = 12) -> dict[str, np.ndarray]:
    return {"input_ids": (np.arange(num_rows * 9).reshape(num_rows, 9) * 7 % VOCAB).astype(np.int32)}


def marking_collate(rows_, example_ids):
    """Marks the first target of example 5 with -100, as other libraries' collates mark ignored positions."""
    blocks = np.asarray(rows_["input_ids"], np.int32)
    targets = blocks[:, 1:].copy()
    targets[example_ids == 5, 0] = -100
    return {"input_ids": blocks[:, :-1], "targets": targets, "example_id": example_ids}


def pair_collate(rows_, example_ids):
    """Token ids in fields of the trainer's own naming, `[B, 2, T]`; one id past the vocabulary in example 3."""
    blocks = np.asarray(rows_["input_ids"], np.int32)
    pairs = np.stack([blocks, blocks[:, ::-1]], axis=1)
    pairs[example_ids == 3, 1, 4] = VOCAB
    return {"pair_inputs": pairs[..., :-1], "pair_targets": pairs[..., 1:], "example_id": example_ids}


def test_a_negative_target_from_a_custom_collate_is_refused_naming_field_example_and_fix():
    batches = TrainBatches(rows(), 12, seed=0, collate=marking_collate, vocab_size=VOCAB, read_options=NO_PREFETCH)
    expected = (r"^A batch from `collate` holds .*\[0, 50\).*field 'targets'.*example id 5.*"
                r"position 0 holds token id -100.*loss_mask")
    with pytest.raises(TokenRangeError, match=expected) as caught:
        next(batches.iterator())
    assert (caught.value.field, caught.value.row, caught.value.token_id) == ("targets", 5, -100)


def test_fields_of_a_trainers_own_naming_are_checked_when_named():
    batches = EvalBatches(rows(), 4, collate=pair_collate, vocab_size=VOCAB,
                          token_fields=("pair_inputs", "pair_targets"))
    with pytest.raises(TokenRangeError, match=r"field 'pair_inputs'.*example id 3.*position \(1, 4\) holds token "
                                              r"id 50.*resize_token_embeddings"):
        list(batches)


def test_ids_inside_the_vocabulary_and_loaders_without_a_vocab_size_pass():
    for vocab_size in (VOCAB, None):
        train = TrainBatches(rows(), 4, seed=0, vocab_size=vocab_size, read_options=NO_PREFETCH)
        assert next(train.iterator())["input_ids"].shape == (4, 8)
        assert len(list(EvalBatches(rows(), 8, vocab_size=vocab_size))) == 2
    unchecked = TrainBatches(rows(), 12, seed=0, collate=marking_collate, read_options=NO_PREFETCH)
    assert next(unchecked.iterator())["targets"].min() == -100  # no vocab_size: the trainer gave none


def test_a_bad_vocab_size_is_refused_when_the_loader_is_built():
    with pytest.raises(ValueError, match="vocab_size"):
        TrainBatches(rows(), 4, seed=0, vocab_size=0)
