"""The work a resume does before its arrays are read: listing the complete checkpoints of a directory and reading
its JSON items, each as often as the checks need it, not once per check that happens to ask."""

import asyncio
from pathlib import Path

import jax
import pytest

from easytrain import checkpoint, checkpoint_dirs
from easytrain.checkpoint import CheckpointManager, finalized_steps
from easytrain.trainers.resume import restore_checkpoint


@pytest.fixture
def event_loops(monkeypatch) -> list[int]:
    """One entry per asyncio event loop created (Orbax runs each of its synchronous calls on a new one)."""
    created, new_loop = [], asyncio.new_event_loop
    monkeypatch.setattr(asyncio, "new_event_loop", lambda: created.append(1) or new_loop())
    return created


def test_listing_checkpoints_runs_one_event_loop_however_many_steps_there_are(tmp_path, event_loops):
    for name in ("2", "4", "6", "8"):
        (tmp_path / name / "state").mkdir(parents=True)
        (tmp_path / name / "run_info").mkdir()
    (tmp_path / "10.orbax-checkpoint-tmp-123" / "state").mkdir(parents=True)  # a save still being written
    (tmp_path / "12" / "state").mkdir(parents=True)  # no run_info: not this library's checkpoint
    assert finalized_steps(tmp_path) == [2, 4, 6, 8]
    assert len(event_loops) <= 1
    assert finalized_steps(tmp_path / "missing") == [] and checkpoint_dirs._is_checkpoint(tmp_path / "4")


@pytest.fixture
def listings(monkeypatch) -> list[Path]:
    """The directories `CheckpointManager` listed (`finalized_steps`), in order."""
    listed, real = [], checkpoint.finalized_steps
    monkeypatch.setattr(checkpoint, "finalized_steps", lambda directory: listed.append(directory) or real(directory))
    return listed


def test_checking_the_items_of_a_step_lists_the_checkpoints_once(finished_run, listings):
    with CheckpointManager(finished_run / "checkpoints", read_only=True) as manager:
        manager.check_items(4)
        assert len(listings) == 1
        with pytest.raises(checkpoint.CheckpointNotFoundError, match=r"step 3 .*available: \[2, 4\]"):
            manager.check_items(3)


def _metadata_target(manager: CheckpointManager, step: int):
    """The stored state's own tree as restore targets on the first device (what a trainer's target holds)."""
    tree = manager._manager.item_metadata(step).state
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    return jax.tree.map(lambda leaf: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=device),
                        getattr(tree, "tree", tree))


def test_a_resume_reads_the_data_position_once_and_lists_the_checkpoints_a_few_times(finished_run, listings,
                                                                                     monkeypatch):
    root = finished_run / "checkpoints"
    with CheckpointManager(root, read_only=True) as manager:
        run_info, position, target = manager.read_run_info(4), manager.read_data_state(4), _metadata_target(manager, 4)
    fingerprint = {key: position[key] for key in ("seed", "global_batch_size", "num_rows", "data_digest")}
    reads, read = [], CheckpointManager.read_data_state
    monkeypatch.setattr(CheckpointManager, "read_data_state", lambda self, step: reads.append(step) or read(self, step))
    listings.clear()
    restored = restore_checkpoint((root, 4), run_info, target, data_fingerprint=fingerprint)
    assert restored.data_state == position and reads == [4]
    assert len(listings) <= 6, f"{len(listings)} listings of {root} for one resume"


def test_a_save_and_its_restore_digest_small_arrays_on_the_host_without_compiling(tmp_path, monkeypatch):
    """Each small array's digest is a program compiled per shape at the first save and the first restore: NumPy
    computes the same digest (`integrity._host_digest`) in less time than the program takes to launch."""
    import jax.numpy as jnp

    from easytrain import integrity

    state = {"w": jnp.arange(12.0).reshape(3, 4), "b": jnp.ones(7, jnp.bfloat16), "n": jnp.int32(5),
             "key": jax.random.key(0), "large": jnp.ones(integrity.SMALL_ON_HOST + 1)}
    on_device, digest = [], integrity._digest
    monkeypatch.setattr(integrity, "_digest", lambda leaf: on_device.append(str(leaf.dtype)) or digest(leaf))
    with CheckpointManager(tmp_path, owner=True) as manager:
        manager.save(1, state=state, data_state={}, run_info={})
    saved = sorted(on_device)
    on_device.clear()
    with CheckpointManager(tmp_path, read_only=True) as manager:
        target = jax.tree.map(lambda leaf: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=leaf.sharding), state)
        restored, _, _ = manager.restore(1, abstract_state=target)
    values = lambda tree: jax.tree.map(lambda leaf: jax.random.key_data(leaf) if leaf is tree["key"] else leaf, tree)
    assert all(jax.tree.leaves(jax.tree.map(lambda a, b: bool((a == b).all()), values(restored), values(state))))
    assert saved == sorted(on_device) == ["float32", "key<fry>"]  # the large array and the PRNG key


def test_small_arrays_are_copied_to_the_host_together_not_one_blocking_copy_each(monkeypatch):
    """On a GPU each `np.asarray` of a device array waits for its own copy: a save's few hundred norm scales and
    their optimizer moments are asked for together (`jax.device_get` of a group), to the same digests."""
    import jax.numpy as jnp

    from easytrain import integrity

    tree = {f"scale{index}": jnp.full((8,), index, jnp.float32) for index in range(40)}
    expected = integrity.fingerprint(tree)  # every leaf through the compiled digest
    requests, device_get = [], jax.device_get
    monkeypatch.setattr(jax, "device_get", lambda values: requests.append(len(values)) or device_get(values))
    assert integrity.fingerprint(tree, integrity.SMALL_ON_HOST) == expected
    assert requests == [40]
