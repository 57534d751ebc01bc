"""Packing and padding: rows hold whole examples that cannot see each other, in few shapes.

The model test is the one that matters: a packed row gives the same logits and per-example
losses as running each example alone, and it stops doing so without restarted positions or
without segment ids, so the test can fail.
"""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")


import datasets
import numpy as np
import pytest
from flax import nnx
from model_configs import VOCAB, tiny_config

from easytrain.data import DataError, TrainBatches, eval_batches
from easytrain.data.packing import (
    BATCH_KEYS,
    PaddedCollate,
    best_fit_decreasing,
    bucket_lengths,
    pack_examples,
    packed_collate,
)
from easytrain.models import init_model


def random_examples(lengths, seed=0, prompt_fraction=0.3):
    """Token ids in the tiny model's vocabulary; the first ~30% of each example is an unsupervised prompt."""
    rng = np.random.default_rng(seed)
    ids = [rng.integers(1, VOCAB, n).tolist() for n in lengths]
    masks = [[0] * max(1, int(n * prompt_fraction)) + [1] * (n - max(1, int(n * prompt_fraction)))
             for n in lengths]
    return {"input_ids": ids, "loss_mask": masks}


def object_rows(examples):
    """Columns as the loader reads ragged rows from a dataset in numpy format: object arrays of int arrays."""
    rows = {}
    for name, column in examples.items():
        rows[name] = np.empty(len(column), dtype=object)
        rows[name][:] = [np.asarray(row) for row in column]
    return rows


def collated(packed):
    return packed_collate(packed.rows, np.arange(len(packed.rows["input_ids"])))


def segment_of(batch, row, segment):
    return np.flatnonzero(batch["segment_ids"][row] == segment)


# --- best-fit decreasing ------------------------------------------------------------------------

def reference_bfd_loads(sizes, capacity):
    """Quadratic textbook BFD: the multiset of bin loads does not depend on tie-breaking."""
    loads = []
    for size in sorted(sizes, reverse=True):
        fits = [i for i, load in enumerate(loads) if load + size <= capacity]
        if fits:
            best = max(fits, key=lambda i: loads[i])
            loads[best] += size
        else:
            loads.append(size)
    return sorted(loads)


def test_bfd_matches_textbook_and_places_every_item_once():
    rng = np.random.default_rng(0)
    for trial in range(20):
        capacity = int(rng.integers(8, 64))
        sizes = rng.integers(1, capacity + 1, int(rng.integers(1, 200)))
        bins = best_fit_decreasing(sizes, capacity)
        members = np.concatenate(bins)
        assert sorted(members.tolist()) == list(range(len(sizes)))
        loads = [int(sizes[b].sum()) for b in bins]
        assert max(loads) <= capacity
        assert sorted(loads) == reference_bfd_loads(sizes.tolist(), capacity)


def test_bfd_fills_bins_of_100k_items_past_99_percent():
    sizes = np.random.default_rng(1).integers(1, 2049, 100_000)
    bins = best_fit_decreasing(sizes, 2048)  # its speed: benchmarks/data.py (no timing in tests)
    assert sum(int(sizes[b].sum()) for b in bins) / (len(bins) * 2048) > 0.99


def test_packing_100k_examples_places_each_once_and_fills_rows():
    rng = np.random.default_rng(9)
    lengths = rng.integers(2, 64, 100_000)
    tokens = rng.integers(1, VOCAB, int(lengths.sum())).astype(np.int32)
    bounds = np.cumsum(lengths)[:-1]
    dataset = datasets.Dataset.from_dict({"input_ids": np.split(tokens, bounds),
                                          "loss_mask": np.split(np.ones_like(tokens, np.int8), bounds)})
    packed = pack_examples(dataset, 512, seed=0)
    assert sorted(packed.pieces[:, 2].tolist()) == list(range(100_000))  # each example exactly once
    assert packed.stats["fill_rate"] > 0.99


def test_bfd_refuses_items_larger_than_a_bin():
    with pytest.raises(DataError, match=r"\[1, 8\]"):
        best_fit_decreasing([3, 9], 8)


# --- packed rows ------------------------------------------------------------------------------

@pytest.mark.parametrize("strategy", ["bfd", "wrapped"])
def test_packed_rows_hold_each_example_exactly(strategy):
    lengths = np.random.default_rng(2).integers(2, 33, 60)
    examples = random_examples(lengths)
    packed = pack_examples(examples, 32, strategy=strategy, seed=3)
    batch = collated(packed)
    assert set(batch) == set(BATCH_KEYS) and batch["input_ids"].shape[1] == 32
    rebuilt = {e: [] for e in range(len(lengths))}
    for row, segment, example, first, count in packed.pieces:
        cols = segment_of(batch, row, segment)
        assert len(cols) == count - 1 and np.all(np.diff(cols) == 1)  # contiguous
        np.testing.assert_array_equal(batch["positions"][row, cols], np.arange(count - 1))
        ids = np.asarray(examples["input_ids"][example][first : first + count])
        np.testing.assert_array_equal(batch["input_ids"][row, cols], ids[:-1])
        np.testing.assert_array_equal(batch["targets"][row, cols], ids[1:])  # no target crosses examples
        mask = np.asarray(examples["loss_mask"][example][first : first + count])
        np.testing.assert_array_equal(batch["loss_mask"][row, cols], mask[1:])
        rebuilt[example].append((first, count))
    for example, pieces in rebuilt.items():  # every example present, pieces tile it once
        pieces.sort()
        assert pieces[0][0] == 0 and sum(count - 1 for _, count in pieces) == lengths[example] - 1
    if strategy == "bfd":
        assert all(len(pieces) == 1 for pieces in rebuilt.values())
    else:
        assert any(len(pieces) > 1 for pieces in rebuilt.values())
        assert np.all(batch["attention_mask"][:-1] == 1)  # only the last row has padding
    real = batch["segment_ids"] > 0
    np.testing.assert_array_equal(batch["attention_mask"], real)
    assert np.all(batch["loss_mask"][~real] == 0) and np.all(batch["positions"][~real] == 0)
    assert packed.stats["fill_rate"] == pytest.approx(real.sum() / real.size)
    assert packed.stats["num_tokens"] == int(np.sum(lengths - 1))


def test_segments_are_numbered_from_one_in_each_row_and_their_positions_restart_at_zero():
    """Positions are read by custom models and by RoPE (where a row's offset changes bfloat16 results), though
    segment masks plus RoPE's relative angles make the tiny model's logits agree without the restart."""
    packed = pack_examples(random_examples([5, 3, 9, 2, 7, 4, 4]), 12, seed=0)
    batch = collated(packed)
    for row, positions in zip(batch["segment_ids"], batch["positions"]):
        numbers = row[row > 0]
        assert numbers[0] == 1 and set(np.diff(numbers)) <= {0, 1}
        assert np.all(row[np.argmax(row == 0):] == 0) or np.all(row > 0)  # padding only at the end
        for segment in set(numbers.tolist()):
            np.testing.assert_array_equal(positions[row == segment], np.arange(np.sum(row == segment)))
        assert np.all(positions[row == 0] == 0)
    assert any(len(set(row[row > 0].tolist())) > 1 for row in batch["segment_ids"]), "rows hold several segments"


@pytest.mark.parametrize("strategy", ["bfd", "wrapped"])
def test_packing_is_a_function_of_data_and_seed(strategy):
    examples = random_examples(np.random.default_rng(4).integers(2, 40, 80))
    first, again = (pack_examples(examples, 48, strategy=strategy, seed=7) for _ in range(2))
    other = pack_examples(examples, 48, strategy=strategy, seed=8)
    for name in first.rows:
        np.testing.assert_array_equal(first.rows[name], again.rows[name])
    assert not np.array_equal(first.rows["input_ids"], other.rows["input_ids"])
    assert first.stats["num_tokens"] == other.stats["num_tokens"]


def test_bfd_fills_rows_better_than_one_example_per_row():
    lengths = np.random.default_rng(5).integers(2, 130, 2000)
    packed = pack_examples(random_examples(lengths), 256)
    assert packed.stats["fill_rate"] > 0.97
    assert packed.stats["num_rows"] < len(lengths) / 3


def test_overflow_truncates_splits_or_drops_and_counts():
    examples = random_examples([20, 6, 12], prompt_fraction=0.0)
    ids = np.asarray(examples["input_ids"][0])
    right = pack_examples(examples, 8, overflow="right")
    assert right.stats["truncated"] == 2
    piece = next(p for p in right.pieces if p[2] == 0)
    assert tuple(piece[3:]) == (0, 9)
    left = pack_examples(examples, 8, overflow="left")
    piece = next(p for p in left.pieces if p[2] == 0)
    assert tuple(piece[3:]) == (11, 9)
    batch = collated(left)
    np.testing.assert_array_equal(batch["targets"][piece[0], segment_of(batch, piece[0], piece[1])], ids[12:])
    split = pack_examples(examples, 8, overflow="split")
    assert split.stats["split"] == 2 and split.stats["num_tokens"] == 19 + 5 + 11
    assert sorted(tuple(p[3:]) for p in split.pieces if p[2] == 0) == [(0, 9), (8, 9), (16, 4)]
    dropped = pack_examples(examples, 8, overflow="drop")
    assert dropped.stats["dropped_too_long"] == 2 and set(dropped.pieces[:, 2]) == {1}


def test_pieces_without_supervised_targets_are_dropped_and_counted():
    examples = {"input_ids": [[1, 2, 3], [4, 5, 6, 7], [8]], "loss_mask": [[0, 1, 1], [0, 0, 0, 0], [1]]}
    packed = pack_examples(examples, 8)
    assert packed.stats["dropped_no_supervised_tokens"] == 2 and set(packed.pieces[:, 2]) == {0}
    with pytest.raises(DataError, match="Nothing to pack"):
        pack_examples({"input_ids": [[1, 2]], "loss_mask": [[1, 0]]}, 8)


def test_pack_reads_a_tokenised_dataset_like_a_mapping():
    examples = random_examples([5, 8, 3, 12, 7])
    dataset = datasets.Dataset.from_dict(examples).filter(lambda ex: len(ex["input_ids"]) != 3)
    packed = pack_examples(dataset, 16, seed=1)
    kept = {name: [col[i] for i in (0, 1, 3, 4)] for name, col in examples.items()}
    expected = pack_examples(kept, 16, seed=1)
    for name in packed.rows:
        np.testing.assert_array_equal(packed.rows[name], expected.rows[name])


# --- the model sees each example as if alone ------------------------------------------------------

@pytest.fixture(scope="module")
def model():
    return init_model(tiny_config(), seed=0)


@nnx.jit
def forward(model, ids_BT, mask_BT, segments_BT, positions_BT):
    return model(ids_BT, attention_mask_BT=mask_BT, segment_ids_BT=segments_BT, positions_BT=positions_BT)


def token_losses(logits_TV, targets_T):
    logits_TV = np.asarray(logits_TV, np.float64)
    log_z = np.log(np.exp(logits_TV - logits_TV.max(-1, keepdims=True)).sum(-1)) + logits_TV.max(-1)
    return log_z - logits_TV[np.arange(len(targets_T)), targets_T]


def run_alone(model, examples):
    """Each example in its own right-padded row, without packing inputs (padding is tested in test_llama)."""
    ids = examples["input_ids"]
    width = max(map(len, ids)) - 1
    ids_BT = np.zeros((len(ids), width), np.int32)
    for b, row in enumerate(ids):
        ids_BT[b, : len(row) - 1] = row[:-1]
    real_BT = (np.arange(width) < np.array([len(r) - 1 for r in ids])[:, None]).astype(np.int32)
    positions_BT = np.broadcast_to(np.arange(width, dtype=np.int32), ids_BT.shape)
    return np.asarray(forward(model, ids_BT, real_BT, real_BT, positions_BT))


def test_packed_row_equals_examples_run_alone(model):
    lengths = [5, 9, 4, 7, 3, 6, 11, 2]
    examples = random_examples(lengths, seed=6)
    packed = pack_examples(examples, 16, seed=0)
    assert max(np.bincount(packed.pieces[:, 0])) >= 3  # some row holds three examples
    batch = collated(packed)
    logits = np.asarray(forward(model, batch["input_ids"], batch["attention_mask"], batch["segment_ids"],
                                batch["positions"]))
    # Naive packing, which the comparison must catch: no segment ids, and positions running on.
    running_BT = np.broadcast_to(np.arange(16, dtype=np.int32), batch["positions"].shape)
    leaky = [np.asarray(forward(model, batch["input_ids"], batch["attention_mask"], batch["attention_mask"],
                                positions)) for positions in (batch["positions"], running_BT)]
    alone = run_alone(model, examples)
    worst_leak = [0.0, 0.0]
    for row, segment, example, _, count in packed.pieces:
        cols = segment_of(batch, row, segment)
        expected = alone[example, : count - 1]
        np.testing.assert_allclose(logits[row, cols], expected, atol=1e-5)
        ids, mask = np.asarray(examples["input_ids"][example]), np.asarray(examples["loss_mask"][example])
        loss_alone = np.sum(token_losses(expected, ids[1:]) * mask[1:])
        packed_losses = token_losses(logits[row, cols], batch["targets"][row, cols])
        loss_packed = np.sum(packed_losses * batch["loss_mask"][row, cols])
        assert loss_packed == pytest.approx(loss_alone, rel=1e-5, abs=1e-5)
        worst_leak = [max(w, float(np.abs(l[row, cols] - expected).max())) for w, l in zip(worst_leak, leaky)]
    assert min(worst_leak) > 1e-3, worst_leak
    # Segment ids alone would pass here: RoPE sees only position differences within a segment.
    # Restarted positions still matter for anything reading absolute positions.


# --- one example per row, bucketed ----------------------------------------------------------------

def test_bucket_lengths():
    assert bucket_lengths(1024) == (16, 32, 64, 128, 256, 512, 1024)
    assert bucket_lengths(1000, smallest=64) == (64, 128, 256, 512, 1000)
    assert bucket_lengths(8) == (8,)


def test_padded_collate_keeps_shapes_to_the_buckets():
    rng = np.random.default_rng(7)
    collate = PaddedCollate(bucket_lengths(256))
    shapes = set()
    for _ in range(200):
        lengths = rng.integers(2, 257, int(rng.integers(1, 9)))
        examples = random_examples(lengths, seed=int(rng.integers(1 << 30)))
        batch = collate(object_rows(examples), np.arange(len(lengths)))
        shapes.add(batch["input_ids"].shape[1])
        assert batch["input_ids"].shape[1] >= max(lengths) - 1
    assert len(shapes) <= len(collate.buckets)


def test_padded_collate_layout_and_eval_padding_rows():
    examples = random_examples([4, 6])
    rows = object_rows(examples)
    batch = PaddedCollate([8, 16])(rows, np.array([0, -1]))
    assert set(batch) == set(BATCH_KEYS) and batch["input_ids"].shape == (2, 8)
    np.testing.assert_array_equal(batch["input_ids"][0, :3], examples["input_ids"][0][:-1])
    np.testing.assert_array_equal(batch["targets"][0, :3], examples["input_ids"][0][1:])
    np.testing.assert_array_equal(batch["loss_mask"][0], [1, 1, 1, 0, 0, 0, 0, 0])  # mask[1:]
    assert batch["loss_mask"][1].sum() == 0 and batch["attention_mask"][1].sum() == 5  # padding row
    np.testing.assert_array_equal(batch["positions"][0], [0, 1, 2, 0, 0, 0, 0, 0])
    np.testing.assert_array_equal(batch["segment_ids"][0], [1, 1, 1, 0, 0, 0, 0, 0])
    same_length = {name: np.asarray(col[:1] * 2) for name, col in examples.items()}  # 2-D, not object
    assert PaddedCollate([8])(same_length, np.arange(2))["input_ids"].shape == (2, 8)
    with pytest.raises(DataError, match="largest bucket"):
        PaddedCollate([2])(rows, np.arange(2))


def test_eos_target_is_learned_when_pad_is_eos():
    """Padding with the EOS id must not mask the real EOS: masks never look at ids."""
    eos = 2
    examples = {"input_ids": [[1, 5, 6, eos], [1, 7, eos]], "loss_mask": [[0, 1, 1, 1], [0, 1, 1]]}
    rows = object_rows(examples)
    padded = PaddedCollate([8], pad_id=eos)(rows, np.arange(2))
    packed = collated(pack_examples(examples, 8))
    for batch in (padded, packed):
        is_eos_target = (batch["targets"] == eos) & (batch["attention_mask"] == 1)
        assert is_eos_target.sum() == 2 and np.all(batch["loss_mask"][is_eos_target] == 1)
        assert np.all(batch["loss_mask"][batch["attention_mask"] == 0] == 0)


def test_loaders_feed_packed_and_padded_rows():
    examples = random_examples(np.random.default_rng(8).integers(2, 30, 40))
    packed = pack_examples(examples, 32)
    with TrainBatches(packed.rows, 4, seed=0, collate=packed_collate).iterator() as train:
        batch = next(train)
    assert batch["input_ids"].shape == (4, 32) and batch["loss_mask"].dtype == np.float32
    dataset = datasets.Dataset.from_dict(examples)
    collate = PaddedCollate(bucket_lengths(32, smallest=8))
    batches = list(eval_batches(dataset, 16, collate=collate))
    assert len(batches) == 3 and batches[-1]["example_id"].tolist()[-8:] == [-1] * 8
    assert batches[-1]["loss_mask"][-8:].sum() == 0
    supervised = sum(b["loss_mask"].sum() for b in batches)
    assert supervised == sum(sum(m[1:]) for m in examples["loss_mask"])
