"""TrainBatches and eval_batches: deterministic, per-process, resumable without replay."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import json

import datasets
import grain
import numpy as np
import pytest

from easytrain.data import DataError, TrainBatches, eval_batches

NO_PREFETCH = grain.ReadOptions(num_threads=0, prefetch_buffer_size=0)


def _rows(num_rows, length=5):
    """Blocks whose tokens all equal their row index, so a batch shows which rows it holds."""
    return {"input_ids": np.repeat(np.arange(num_rows)[:, None], length, axis=1)}


def _take(iterator, count):
    return [next(iterator) for _ in range(count)]


def _ids(batches):
    return [b["example_id"].tolist() for b in batches]


def test_batches_follow_the_contract_and_hold_the_rows_they_name():
    loader = TrainBatches(_rows(10), 4, seed=0)
    batch = next(loader.iterator())
    assert {k: (v.dtype.name, v.shape) for k, v in batch.items()} == {
        "input_ids": ("int32", (4, 4)),
        "targets": ("int32", (4, 4)),
        "loss_mask": ("float32", (4, 4)),
        "example_id": ("int32", (4,)),
    }
    np.testing.assert_array_equal(batch["input_ids"][:, 0], batch["example_id"])


@pytest.mark.parametrize(("num_rows", "batch_size"), [(12, 4), (10, 3)])
def test_each_epoch_visits_every_row_at_most_once(num_rows, batch_size):
    loader = TrainBatches(_rows(num_rows), batch_size, seed=5)
    spe = loader.steps_per_epoch
    assert spe == num_rows // batch_size
    epochs = [np.concatenate(_ids(_take(loader.iterator(e * spe), spe))).tolist() for e in range(3)]
    for rows in epochs:
        assert len(set(rows)) == len(rows) == spe * batch_size
        assert set(rows) <= set(range(num_rows))
        if num_rows % batch_size == 0:
            assert sorted(rows) == list(range(num_rows))
    assert epochs[0] != epochs[1] != epochs[2]
    assert loader.epoch_of(2 * spe) == 2 and loader.epoch_of(2 * spe - 1) == 1


def test_order_is_a_function_of_the_seed():
    first = _ids(_take(TrainBatches(_rows(20), 4, seed=1).iterator(), 12))
    again = _ids(_take(TrainBatches(_rows(20), 4, seed=1).iterator(), 12))
    other = _ids(_take(TrainBatches(_rows(20), 4, seed=2).iterator(), 12))
    assert first == again and first != other


def test_adjacent_seeds_do_not_share_epochs():
    """Seed 1's first epoch is not seed 0's second epoch."""
    seed0 = _ids(_take(TrainBatches(_rows(64), 64, seed=0).iterator(1), 1))
    seed1 = _ids(_take(TrainBatches(_rows(64), 64, seed=1).iterator(0), 1))
    assert seed0 != seed1


def test_dataset_source_matches_dict_source():
    rows = _rows(16)
    dataset = datasets.Dataset.from_dict(rows)
    from_dict = _ids(_take(TrainBatches(rows, 4, seed=3).iterator(), 6))
    from_dataset = _take(TrainBatches(dataset, 4, seed=3).iterator(), 6)
    assert _ids(from_dataset) == from_dict
    np.testing.assert_array_equal(from_dataset[0]["input_ids"][:, 0], from_dict[0])


def test_processes_split_each_global_batch_and_read_only_their_rows():
    rows, steps = _rows(24), 14
    single = _take(TrainBatches(rows, 8, seed=7).iterator(), steps)
    loaders = [
        TrainBatches(rows, 8, seed=7, process_index=p, process_count=2, read_options=NO_PREFETCH)
        for p in range(2)
    ]
    parts = [_take(loader.iterator(), steps) for loader in loaders]
    for step in range(steps):
        first, second = (part[step]["example_id"] for part in parts)
        assert not set(first) & set(second)
        assert first.tolist() + second.tolist() == single[step]["example_id"].tolist()
        np.testing.assert_array_equal(
            np.concatenate([part[step]["input_ids"] for part in parts]), single[step]["input_ids"]
        )
    assert [loader.rows_read for loader in loaders] == [steps * 4, steps * 4]


def test_an_epoch_counts_global_batches_on_every_process():
    """24 rows, global batch 8: 3 steps an epoch on each of 2 processes, as on one (not 24 rows over a process's 4):
    the epoch strategies and the logged epoch count optimizer steps."""
    for source in (_rows(24), datasets.Dataset.from_dict(_rows(24))):
        loaders = [TrainBatches(source, 8, seed=0, process_index=p, process_count=2, read_options=NO_PREFETCH)
                   for p in range(2)]
        assert [loader.steps_per_epoch for loader in loaders] == [3, 3]
        assert [loader.epoch_of(3) for loader in loaders] == [1, 1]


@pytest.mark.parametrize("stop", [3, 7, 13])  # epochs 0, 2 and 4 (steps_per_epoch is 3)
def test_restored_state_continues_identically_without_replay(stop):
    rows = _rows(10)
    original = TrainBatches(rows, 3, seed=11).iterator()
    _take(original, stop)
    state = json.loads(json.dumps(original.get_state()))
    expected = _take(original, 5)
    resumed_loader = TrainBatches(rows, 3, seed=11, read_options=NO_PREFETCH)
    resumed = resumed_loader.iterator()
    resumed.set_state(state)
    got = _take(resumed, 5)
    assert _ids(got) == _ids(expected)
    for a, b in zip(got, expected, strict=True):
        np.testing.assert_array_equal(a["input_ids"], b["input_ids"])
    assert resumed_loader.rows_read == 5 * 3  # only the batches after the restored step
    assert resumed.get_state()["step"] == stop + 5


def test_start_step_equals_set_state():
    loader = TrainBatches(_rows(10), 2, seed=0)
    started = loader.iterator(start_step=9)
    restored = loader.iterator()
    restored.set_state({**restored.get_state(), "step": 9})
    assert _ids(_take(started, 4)) == _ids(_take(restored, 4))


def test_restoring_far_into_training_reads_only_the_rows_it_serves():
    loader = TrainBatches(_rows(1000), 10, seed=0)
    far = 10**9 + 7
    batch = next(loader.iterator(start_step=far))
    assert loader.rows_read <= 10 * 5  # the batch plus the prefetch buffer, never the past
    sequential_epoch = _ids(_take(loader.iterator(start_step=far - 7), 8))[-1]
    assert batch["example_id"].tolist() == sequential_epoch


def test_state_restores_into_a_different_process_count():
    rows = _rows(16)
    single = TrainBatches(rows, 4, seed=2).iterator()
    _take(single, 6)
    state = single.get_state()
    expected = _ids(_take(single, 3))
    parts = []
    for p in range(2):
        iterator = TrainBatches(rows, 4, seed=2, process_index=p, process_count=2).iterator()
        iterator.set_state(state)
        parts.append(_ids(_take(iterator, 3)))
    assert [a + b for a, b in zip(*parts, strict=True)] == expected


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"seed": 1}, r"saved with .*'seed': 1"),
        ({"global_batch_size": 4}, "'global_batch_size': 4"),
        ({"num_rows": 11}, "'num_rows': 11"),
    ],
)
def test_state_from_other_settings_is_rejected(change, match):
    iterator = TrainBatches(_rows(10), 2, seed=0).iterator()
    with pytest.raises(DataError, match=match + ".*same dataset, seed and global_batch_size"):
        iterator.set_state({**iterator.get_state(), **change})


def test_bad_step_in_state_is_rejected():
    iterator = TrainBatches(_rows(10), 2, seed=0).iterator()
    with pytest.raises(DataError, match="negative step"):
        iterator.set_state({**iterator.get_state(), "step": -1})
    state = iterator.get_state()
    del state["step"]
    with pytest.raises(DataError, match="saved with"):
        iterator.set_state(state)


def test_iterator_closes_its_threads():
    with TrainBatches(_rows(10), 2, seed=0).iterator() as iterator:
        next(iterator)
    with pytest.raises(ValueError, match="closed iterator"):
        next(iterator)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"global_batch_size": 11}, "has 10 rows, but one global batch needs 11"),
        ({"global_batch_size": 0}, "`global_batch_size` must be at least 1"),
        ({"global_batch_size": 2, "seed": -1}, "`seed` must be non-negative"),
        ({"global_batch_size": 4, "process_count": 3}, "4 is not divisible by `process_count` 3"),
        ({"global_batch_size": 4, "process_index": 2, "process_count": 2}, "`process_index`"),
    ],
)
def test_train_setting_errors(kwargs, match):
    with pytest.raises(DataError, match=match):
        TrainBatches(_rows(10), **{"seed": 0, **kwargs})


def test_source_errors():
    with pytest.raises(DataError, match="equal length"):
        TrainBatches({"a": np.zeros(4), "b": np.zeros(5)}, 2, seed=0)
    with pytest.raises(DataError, match=r"datasets\.Dataset or a mapping"):
        TrainBatches([[1, 2]], 1, seed=0)


@pytest.mark.parametrize("batch_size", [1, 3, 8])
def test_eval_pads_the_last_batch_and_counts_every_example_once(batch_size):
    batches = list(eval_batches(_rows(10), batch_size))
    assert len(batches) == -(-10 // batch_size)
    assert {b["input_ids"].shape for b in batches} == {(batch_size, 4)}
    ids = np.concatenate([b["example_id"] for b in batches])
    masks = np.concatenate([b["loss_mask"] for b in batches])
    real = ids >= 0
    assert ids[real].tolist() == list(range(10))  # in order, once each
    assert (ids[~real] == -1).all() and (masks[~real] == 0).all() and (masks[real] == 1).all()


@pytest.mark.parametrize(("num_rows", "batch_size"), [(10, 4), (3, 8)])
def test_eval_processes_share_batches_and_agree_on_their_count(num_rows, batch_size):
    parts = [
        list(eval_batches(_rows(num_rows), batch_size, process_index=p, process_count=2))
        for p in range(2)
    ]
    assert len(parts[0]) == len(parts[1]) == -(-num_rows // batch_size)
    ids = np.concatenate([b["example_id"] for batches in zip(*parts, strict=True) for b in batches])
    assert sorted(ids[ids >= 0].tolist()) == list(range(num_rows))
    assert all(b["input_ids"].shape == (batch_size // 2, 4) for batches in parts for b in batches)


def test_eval_with_a_custom_collate_and_dataset_source():
    """The loader names no field: padding rows reach the collate with example id -1, and it weighs them."""
    def collate(rows, example_ids):
        return {"x": rows["x"].astype(np.float32), "weight": (example_ids >= 0).astype(np.float32),
                "example_id": example_ids}

    source = datasets.Dataset.from_dict({"x": [10, 11, 12]})
    batches = list(eval_batches(source, 2, collate=collate))
    assert [b["x"].tolist() for b in batches] == [[10, 11], [12, 10]]
    assert [b["example_id"].tolist() for b in batches] == [[0, 1], [2, -1]]
    assert [b["weight"].tolist() for b in batches] == [[1, 1], [1, 0]]


def test_eval_rejects_an_empty_source():
    with pytest.raises(DataError, match="evaluation dataset has no rows"):
        eval_batches({"input_ids": np.zeros((0, 5))}, 2)


@pytest.mark.parametrize("batch_size, devices, expected", [(100_000, 8, 64), (16, 8, 16), (100, 1, 64), (7, 1, 7)])
def test_an_eval_batch_larger_than_the_eval_set_shrinks_to_fit_it(batch_size, devices, expected):
    """38 rows in batches of 100000 would pad 99962 rows (and may not fit in memory): the batch shrinks to a power
    of two of the data-parallel devices, at least 64 rows; the same examples are evaluated once each."""
    from easytrain.data import EvalBatches

    batches = EvalBatches(_rows(38), batch_size, multiple_of=devices)
    assert batches.global_batch_size == expected and len(batches) == -(-38 // expected)
    ids = np.concatenate([batch["example_id"] for batch in batches])
    assert sorted(ids[ids >= 0].tolist()) == list(range(38))


def _formats():
    """Datasets of several column kinds, the last three formatted batch by batch (strings, ragged rows, nulls)."""
    rng = np.random.default_rng(0)
    numeric = datasets.Dataset.from_dict({
        "input_ids": rng.integers(0, 50, (12, 6)).astype(np.int32), "weight": rng.random(12).astype(np.float32),
        "keep": rng.random(12) > 0.5, "pixels": rng.random((12, 2, 3)), "label": np.arange(12, dtype=np.uint8)})
    return {"numeric": (numeric, True), "selected": (numeric.shuffle(seed=1).select(range(9)), True),
            "strings": (datasets.Dataset.from_dict({"text": [f"row {i}" for i in range(12)]}), False),
            "ragged": (datasets.Dataset.from_dict({"input_ids": [[1, 2, 3], [4, 5]] * 6}), False),
            "nulls": (datasets.Dataset.from_dict({"label": [1, None, 3] * 4}), False)}


@pytest.mark.parametrize("name", list(_formats()))
def test_rows_read_from_a_numpy_copy_equal_the_formatted_rows(name):
    from easytrain.data import row_reader

    dataset, copied = _formats()[name]
    reader = row_reader.RowReader(dataset, whole_copy=True)
    for indices in (np.array([3, 0, 7]), np.array([5]), np.arange(len(dataset))[::-1]):
        read, expected = reader.read(indices), dataset.with_format("numpy")[indices.tolist()]
        assert sorted(read) == sorted(expected)
        for column, values in expected.items():
            if isinstance(values, np.ndarray) and values.dtype != object:
                assert read[column].dtype == values.dtype, column
                np.testing.assert_array_equal(read[column], values)
            else:
                assert [np.asarray(v).tolist() for v in read[column]] == [np.asarray(v).tolist() for v in values]
    assert isinstance(reader._source, dict) is copied  # formatted once, or batch by batch
    assert reader.rows_read == 3 + 1 + len(dataset)


def test_a_dataset_over_the_copy_limit_is_formatted_batch_by_batch(monkeypatch):
    from easytrain.data import row_reader

    monkeypatch.setattr(row_reader, "_COPY_LIMIT", 64)
    dataset = datasets.Dataset.from_dict(_rows(16))
    reader = row_reader.RowReader(dataset, whole_copy=True)
    np.testing.assert_array_equal(reader.read(np.array([2, 9]))["input_ids"][:, 0], [2, 9])
    assert isinstance(reader._source, datasets.Dataset)


def test_only_a_single_process_loader_copies_the_dataset_and_it_reads_the_same_rows():
    dataset = datasets.Dataset.from_dict(_rows(16))
    single = TrainBatches(dataset, 4, seed=3, read_options=NO_PREFETCH)
    shared = TrainBatches(dataset, 4, seed=3, process_index=0, process_count=2, read_options=NO_PREFETCH)
    first, half = next(single.iterator()), next(shared.iterator())
    np.testing.assert_array_equal(half["input_ids"], first["input_ids"][:2])
    assert isinstance(single._reader._source, dict)  # one process: formatted once
    assert isinstance(shared._reader._source, datasets.Dataset)  # two: each formats only its own rows
