"""Checkpoint round trips, retention (the newest, and the best by a finite metric: the earliest of equal ones),
strict restore, resume resolution (the latest is the highest step, not the last name) and the save a run's end
waits for."""

from __future__ import annotations

import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import struct
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from easytrain.checkpoint import (
    CheckpointManager,
    CheckpointMismatchError,
    CheckpointNotFoundError,
    finalized_steps,
    resolve_checkpoint,
)
from easytrain.retention import best_index

DATA_STATE = {"epoch": 1, "position": 37, "shard_order": [2, 0, 1]}
RUN_INFO = {"format_version": 1, "args": {"learning_rate": 3e-4}, "model": {"hidden": 8}}


class TrainState(struct.PyTreeNode):
    step: jax.Array
    params: dict
    opt_state: optax.OptState
    rng: jax.Array


def build_state(seed: int = 0, hidden: int = 8) -> TrainState:
    """A small but realistic state: nested params, a stepped adamw state, a typed key."""
    keys = jax.random.split(jax.random.key(seed), 4)
    params = {
        "embed": {"table": jax.random.normal(keys[0], (16, hidden))},
        "block_0": {
            "dense": {"kernel": jax.random.normal(keys[1], (hidden, hidden)), "bias": jnp.zeros(hidden)},
            "norm": {"scale": jnp.ones(hidden, jnp.bfloat16)},
        },
    }
    tx = optax.adamw(1e-3)
    opt_state = tx.init(params)
    grads = jax.tree.map(lambda p: jax.random.normal(keys[2], p.shape).astype(p.dtype), params)
    _, opt_state = tx.update(grads, opt_state, params)
    return TrainState(step=jnp.asarray(5, jnp.int32), params=params, opt_state=opt_state, rng=keys[3])


def abstract_of(tree, sharding=None):
    """ShapeDtypeStructs carrying each leaf's (or the given) target sharding."""
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding or x.sharding), tree)


def assert_trees_identical(actual, expected) -> None:
    assert jax.tree.structure(actual) == jax.tree.structure(expected)
    for got, want in zip(jax.tree.leaves(actual), jax.tree.leaves(expected), strict=True):
        assert got.dtype == want.dtype
        if jax.dtypes.issubdtype(want.dtype, jax.dtypes.prng_key):
            got, want = jax.random.key_data(got), jax.random.key_data(want)
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


def save_steps(manager: CheckpointManager, state, steps, metric: str | None = None, values=None) -> None:
    for index, step in enumerate(steps):
        metrics = {metric: values[index]} if metric else None
        assert manager.save(step, state=state, data_state=DATA_STATE, run_info=RUN_INFO, metrics=metrics)
    manager.wait_until_finished()


@pytest.fixture(scope="module")
def state() -> TrainState:
    return jax.jit(build_state)()  # one compilation instead of many eager ones


# ----------------------------------------------------------------------------- round trips


@pytest.mark.parametrize("async_save", [True, False])
def test_round_trip_is_bit_identical(tmp_path: Path, state: TrainState, async_save: bool) -> None:
    copy = jax.tree.map(lambda x: jnp.array(x, copy=True), state)
    with CheckpointManager(tmp_path / "checkpoints", async_save=async_save) as manager:
        assert manager.save(10, state=copy, data_state=DATA_STATE, run_info=RUN_INFO)
        for leaf in jax.tree.leaves(copy):
            leaf.delete()  # as if donated to the next step while the save is in flight
        manager.wait_until_finished()
        assert manager.latest_step() == 10
        restored, data_state, run_info = manager.restore(10, abstract_state=abstract_of(state))
    assert isinstance(restored, TrainState)
    assert_trees_identical(restored, state)
    assert data_state == DATA_STATE
    assert run_info == RUN_INFO


def test_restore_in_a_fresh_manager(tmp_path: Path, state: TrainState) -> None:
    with CheckpointManager(tmp_path) as manager:
        save_steps(manager, state, [3])
    with CheckpointManager(tmp_path) as manager:
        assert manager.all_steps() == [3]
        restored, _, _ = manager.restore(3, abstract_state=abstract_of(state))
    assert_trees_identical(restored, state)


def test_restore_onto_another_sharding(tmp_path: Path, state: TrainState) -> None:
    mesh = Mesh(np.array(jax.devices()[:1]), ("data",))
    target = NamedSharding(mesh, PartitionSpec())
    with CheckpointManager(tmp_path) as manager:
        save_steps(manager, state, [1])
        restored, _, _ = manager.restore(1, abstract_state=abstract_of(state, target))
    for leaf in jax.tree.leaves(restored):
        assert leaf.sharding == target
    assert_trees_identical(restored, state)


def test_background_save_errors_are_raised(
    tmp_path: Path, state: TrainState, monkeypatch: pytest.MonkeyPatch
) -> None:
    from orbax.checkpoint._src.path import atomicity

    async def fail(self) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(atomicity.AtomicRenameTemporaryPath, "finalize", fail)  # the final rename
    manager = CheckpointManager(tmp_path)
    assert manager.save(1, state=state, data_state=DATA_STATE, run_info=RUN_INFO)
    with pytest.raises(OSError, match="disk full"):
        manager.wait_until_finished()
    assert manager.latest_step() is None
    monkeypatch.undo()
    manager.close()


def test_read_run_info_reads_only_json(tmp_path: Path, state: TrainState) -> None:
    with CheckpointManager(tmp_path) as manager:
        save_steps(manager, state, [4])
        assert manager.read_run_info(4) == RUN_INFO
        with pytest.raises(CheckpointNotFoundError, match="step 5"):
            manager.read_run_info(5)


def test_save_skips_a_step_that_is_saved_or_not_newer(tmp_path: Path, state: TrainState) -> None:
    with CheckpointManager(tmp_path) as manager:
        save_steps(manager, state, [8])
        assert not manager.save(8, state=state, data_state=DATA_STATE, run_info=RUN_INFO)
        assert not manager.save(6, state=state, data_state=DATA_STATE, run_info=RUN_INFO)
        assert not manager.save(8, state=state, data_state=DATA_STATE, run_info=RUN_INFO, force=True)
        assert manager.all_steps() == [8]


def test_force_saves_an_older_step(tmp_path: Path, state: TrainState) -> None:
    with CheckpointManager(tmp_path) as manager:
        save_steps(manager, state, [8])
        assert manager.save(6, state=state, data_state=DATA_STATE, run_info=RUN_INFO, force=True)
        manager.wait_until_finished()
        assert manager.all_steps() == [6, 8]


def test_non_json_data_state_fails_before_saving(tmp_path: Path, state: TrainState) -> None:
    with CheckpointManager(tmp_path) as manager:
        with pytest.raises(TypeError, match="data_state"):
            manager.save(1, state=state, data_state={"bad": object()}, run_info=RUN_INFO)
        assert manager.all_steps() == []


# ----------------------------------------------------------------------------- strict restore


def test_mismatch_lists_missing_unexpected_and_reshaped_keys(tmp_path: Path, state: TrainState) -> None:
    with CheckpointManager(tmp_path) as manager:
        save_steps(manager, state, [2])
        other = jax.eval_shape(lambda: build_state(hidden=4))
        params = dict(other.params)
        params["block_1"] = params.pop("block_0")  # renamed layer: one missing, one unexpected
        with pytest.raises(CheckpointMismatchError) as caught:
            manager.restore(2, abstract_state=abstract_of(other.replace(params=params)))
    error = caught.value
    assert "params.block_1.dense.kernel" in error.missing
    assert "params.block_0.dense.kernel" in error.unexpected
    assert error.mismatched["params.embed.table"] == ("float32[16, 8]", "float32[16, 4]")
    assert "params.block_0.dense.kernel" in str(error) and "float32[16, 4]" in str(error)


def test_mismatch_on_extra_layer_and_dtype(tmp_path: Path, state: TrainState) -> None:
    with CheckpointManager(tmp_path) as manager:
        save_steps(manager, state, [2])
        params = jax.tree.map(lambda x: x, state.params)
        params["head"] = {"kernel": jnp.zeros((8, 2))}
        params["embed"]["table"] = params["embed"]["table"].astype(jnp.bfloat16)
        with pytest.raises(CheckpointMismatchError) as caught:
            manager.restore(2, abstract_state=abstract_of(state.replace(params=params)))
    assert caught.value.missing == ["params.head.kernel"]
    assert caught.value.unexpected == []
    assert caught.value.mismatched == {"params.embed.table": ("float32[16, 8]", "bfloat16[16, 8]")}


def test_mismatch_is_a_value_error(tmp_path: Path, state: TrainState) -> None:
    with CheckpointManager(tmp_path) as manager:
        save_steps(manager, state, [1])
        with pytest.raises(ValueError, match="nothing was loaded"):
            manager.restore(1, abstract_state={"params": abstract_of(state.params)})


# ----------------------------------------------------------------------------- retention


def test_max_to_keep_keeps_the_newest(tmp_path: Path, state: TrainState) -> None:
    with CheckpointManager(tmp_path, max_to_keep=2) as manager:
        save_steps(manager, state, [1, 2, 3, 4])
        assert manager.all_steps() == [3, 4]
        assert manager.best_step() is None


@pytest.mark.parametrize(
    ("metric", "greater_is_better", "values"),
    [("eval_loss", False, [1.0, 2.0, 3.0, 4.0]), ("eval_accuracy", True, [0.9, 0.8, 0.7, 0.6])],
)
def test_best_and_newest_are_both_kept_when_metric_degrades(
    tmp_path: Path, state: TrainState, metric: str, greater_is_better: bool, values: list[float]
) -> None:
    checkpoints = tmp_path / "checkpoints"
    kwargs = {"max_to_keep": 1, "best_metric": metric, "greater_is_better": greater_is_better}
    with CheckpointManager(checkpoints, **kwargs) as manager:
        save_steps(manager, state, [10, 20, 30, 40], metric, values)
        assert manager.all_steps() == [10, 40]
        assert manager.best_step() == 10
        assert manager.latest_step() == 40
    assert resolve_checkpoint(tmp_path, True) == (checkpoints, 40)


def test_best_survives_a_restart(tmp_path: Path, state: TrainState) -> None:
    kwargs = {"max_to_keep": 1, "best_metric": "eval_loss"}
    with CheckpointManager(tmp_path, **kwargs) as manager:
        save_steps(manager, state, [1, 2], "eval_loss", [0.5, 0.9])
    with CheckpointManager(tmp_path, **kwargs) as manager:
        assert manager.best_step() == 1
        save_steps(manager, state, [3], "eval_loss", [0.7])
        assert manager.all_steps() == [1, 3]


def test_checkpoints_without_the_metric_are_never_best(tmp_path: Path, state: TrainState) -> None:
    with CheckpointManager(tmp_path, max_to_keep=1, best_metric="eval_loss") as manager:
        save_steps(manager, state, [1, 2])
        assert manager.all_steps() == [2]
        assert manager.best_step() is None
        save_steps(manager, state, [3, 4], "eval_loss", [float("nan"), 0.3])
        assert manager.all_steps() == [4]
        assert manager.best_step() == 4


def test_the_earliest_of_equal_best_values_is_best() -> None:
    """A later checkpoint that only equals the best does not take its place, in either direction."""
    assert best_index([0.7, 0.5, 0.5, 0.9], greater_is_better=False) == 1
    assert best_index([0.5, 0.9, 0.9], greater_is_better=True) == 1


def test_an_infinite_metric_never_ranks_best() -> None:
    """An overflowed metric ranks no more than a NaN one: -inf is not the lowest loss, inf not the highest score."""
    assert best_index([0.5, float("-inf"), 0.7], greater_is_better=False) == 0
    assert best_index([0.5, float("inf"), 0.2], greater_is_better=True) == 0
    assert best_index([float("inf"), float("nan")], greater_is_better=False) is None


def test_max_to_keep_must_be_positive(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="max_to_keep"):
        CheckpointManager(tmp_path, max_to_keep=0)


# ----------------------------------------------------------------------------- finalized only


def test_leftover_tmp_dir_is_ignored(tmp_path: Path, state: TrainState) -> None:
    checkpoints = tmp_path / "checkpoints"
    with CheckpointManager(checkpoints) as manager:
        save_steps(manager, state, [5])
    leftover = checkpoints / "9.orbax-checkpoint-tmp"
    (leftover / "state").mkdir(parents=True)
    assert resolve_checkpoint(tmp_path, "latest") == (checkpoints, 5)
    with pytest.raises(CheckpointNotFoundError):
        resolve_checkpoint(tmp_path, leftover)
    with CheckpointManager(checkpoints) as manager:
        assert manager.latest_step() == 5
        save_steps(manager, state, [9])  # the interrupted step can be written again
        assert manager.all_steps() == [5, 9]


# ----------------------------------------------------------------------------- resolve_checkpoint


@pytest.fixture
def run_dir(tmp_path: Path, state: TrainState) -> Path:
    with CheckpointManager(tmp_path / "checkpoints") as manager:
        save_steps(manager, state, [100, 120])
    return tmp_path


@pytest.mark.parametrize("value", [None, False, "false"])
def test_resolve_disabled(run_dir: Path, value) -> None:
    assert resolve_checkpoint(run_dir, value) is None


@pytest.mark.parametrize("value", [True, "true", "latest", "LATEST"])
def test_resolve_latest(run_dir: Path, value) -> None:
    assert resolve_checkpoint(run_dir, value) == (run_dir / "checkpoints", 120)


def test_resolve_paths(run_dir: Path) -> None:
    checkpoints = run_dir / "checkpoints"
    assert resolve_checkpoint("/elsewhere", checkpoints / "100") == (checkpoints, 100)
    assert resolve_checkpoint("/elsewhere", str(checkpoints)) == (checkpoints, 120)
    assert resolve_checkpoint("/elsewhere", run_dir) == (checkpoints, 120)


def test_the_latest_is_the_highest_step_not_the_last_name(tmp_path: Path) -> None:
    """Steps 9 and 10: by name '9' sorts last, and a resume would continue the older checkpoint."""
    checkpoints = tmp_path / "checkpoints"
    for step in (10, 9):
        for item in ("state", "run_info"):
            (checkpoints / str(step) / item).mkdir(parents=True)
    assert finalized_steps(checkpoints) == [9, 10]
    assert resolve_checkpoint(tmp_path, "latest") == (checkpoints, 10)
    assert resolve_checkpoint(tmp_path, checkpoints) == (checkpoints, 10)


def test_resolve_missing_path_names_the_setting(run_dir: Path) -> None:
    with pytest.raises(CheckpointNotFoundError, match="resume_from_checkpoint=.*does not exist"):
        resolve_checkpoint(run_dir, run_dir / "checkpoints" / "999")


def test_resolve_directory_without_checkpoints(tmp_path: Path) -> None:
    (tmp_path / "notes").mkdir()
    with pytest.raises(CheckpointNotFoundError, match="not a complete checkpoint"):
        resolve_checkpoint(tmp_path, tmp_path / "notes")
    with pytest.raises(CheckpointNotFoundError, match="no complete checkpoint"):
        resolve_checkpoint(tmp_path, "latest")
    with pytest.raises(FileNotFoundError, match="leave resume_from_checkpoint unset"):
        resolve_checkpoint(tmp_path, True)


# ----------------------------------------------------------------------------- the end of a run


def test_shutting_down_a_failing_run_completes_the_save_in_flight(
    tmp_path: Path, state: TrainState, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`LoopEnding.shut_down` waits for the background save still being written, even while the run fails with
    another error: the run's last checkpoint is complete (resumable) when train() returns, not cut off at exit."""
    from types import SimpleNamespace

    from orbax.checkpoint._src.path import atomicity

    from easytrain.trainers.loop_ending import LoopEnding

    original = atomicity.AtomicRenameTemporaryPath.finalize

    async def slow_finalize(self, *args, **kwargs):
        time.sleep(1)  # the save is still being written when shut_down is called
        return await original(self, *args, **kwargs)

    monkeypatch.setattr(atomicity.AtomicRenameTemporaryPath, "finalize", slow_finalize)
    manager = CheckpointManager(tmp_path / "checkpoints", owner=True)
    ending = LoopEnding()
    ending.manager = manager
    ending.profiler = SimpleNamespace(tracing=False, stop=lambda: None)
    ending.reporter = SimpleNamespace(close=lambda status: None)
    ending.iterator = SimpleNamespace(close=lambda: None)
    ending.heap = SimpleNamespace(check=lambda saving: None)
    try:
        assert manager.save(2, state=state, data_state=DATA_STATE, run_info=RUN_INFO)
        ending.shut_down(failing=True, status="failed")
        assert finalized_steps(tmp_path / "checkpoints") == [2]
    finally:
        manager.close()
