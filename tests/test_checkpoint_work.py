"""The work a resume does before its arrays are read: listing the complete checkpoints of a directory and reading
its JSON items, each as often as the checks need it, not once per check that happens to ask."""

import asyncio
import builtins
import collections
import io
import os
import shutil
import threading
from pathlib import Path

import jax
import orbax.checkpoint as ocp
import pytest

from easytrain import checkpoint, checkpoint_dirs
from easytrain.checkpoint import CheckpointManager, finalized_steps
from easytrain.checkpoint_items import MissingItemError
from easytrain.trainers.lora_record import source_run_info
from easytrain.trainers.restore_checks import stored_record
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
    assert finalized_steps(tmp_path / "missing") == [] and checkpoint_dirs.is_checkpoint(tmp_path / "4")


@pytest.fixture
def listings(monkeypatch) -> list[Path]:
    """The directories `CheckpointManager` listed (`finalized_steps`), in order."""
    listed, real = [], checkpoint.finalized_steps
    monkeypatch.setattr(checkpoint, "finalized_steps", lambda directory: listed.append(directory) or real(directory))
    return listed


def test_checking_the_items_of_a_complete_step_lists_no_checkpoints(finished_run, listings):
    with CheckpointManager(finished_run / "checkpoints", read_only=True) as manager:
        manager.check_items(4)
        assert listings == []
        with pytest.raises(checkpoint.CheckpointNotFoundError, match=r"step 3 .*available: \[2, 4\]"):
            manager.check_items(3)  # only a refusal lists them, to name the steps there
        assert len(listings) == 1


@pytest.fixture
def opened(monkeypatch) -> collections.Counter:
    """Files opened under a `checkpoints` directory, as `<step>/<item>/<file>`, by Orbax's readers or this library's."""
    counts, real = collections.Counter(), io.open

    def counting(file, *args, **kwargs):
        if isinstance(file, (str, os.PathLike)) and "checkpoints" in (parts := Path(os.fspath(file)).parts):
            counts["/".join(parts[parts.index("checkpoints") + 1:])] += 1
        return real(file, *args, **kwargs)

    monkeypatch.setattr(io, "open", counting)
    monkeypatch.setattr(builtins, "open", counting)
    return counts


@pytest.fixture
def scans(monkeypatch) -> list[str]:
    """Each listing of a `checkpoints` directory, by whoever lists it (this library or Orbax)."""
    listed, real_listdir, real_scandir = [], os.listdir, os.scandir

    def counting(real):
        def listing(path="."):
            if Path(os.fspath(path)).name == "checkpoints":
                listed.append(os.fspath(path))
            return real(path)
        return listing

    monkeypatch.setattr(os, "listdir", counting(real_listdir))
    monkeypatch.setattr(os, "scandir", counting(real_scandir))
    return listed


@pytest.fixture
def managers(monkeypatch) -> list[Path]:
    """The directories an Orbax `CheckpointManager` was opened on."""
    opened_on, real = [], ocp.CheckpointManager

    class Counting(real):
        def __init__(self, directory, *args, **kwargs):
            opened_on.append(Path(directory))
            super().__init__(directory, *args, **kwargs)

    monkeypatch.setattr(ocp, "CheckpointManager", Counting)
    return opened_on


def _metadata_target(manager: CheckpointManager, step: int):
    """The stored state's own tree as restore targets on the first device (what a trainer's target holds)."""
    tree = manager._manager.item_metadata(step).state
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    return jax.tree.map(lambda leaf: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=device),
                        getattr(tree, "tree", tree))


def test_a_resume_lists_the_checkpoints_once_and_reads_each_of_its_files_once(finished_run, listings, opened, scans,
                                                                           managers, monkeypatch):
    root = finished_run / "checkpoints"
    with CheckpointManager(root, read_only=True) as manager:
        run_info, position, target = manager.read_run_info(4), manager.read_data_state(4), _metadata_target(manager, 4)
    fingerprint = {key: position[key] for key in ("seed", "global_batch_size", "num_rows", "data_digest")}
    reads, read = [], CheckpointManager.read_data_state
    monkeypatch.setattr(CheckpointManager, "read_data_state", lambda self, step: reads.append(step) or read(self, step))
    listings.clear(), opened.clear(), scans.clear(), managers.clear()
    restored = restore_checkpoint((root, 4), run_info, target, data_fingerprint=fingerprint)
    assert restored.data_state == position and reads == [4]
    assert managers == [root] and len(scans) == 1 and listings == []  # Orbax's own listing as it opens
    json_items = {name: count for name, count in opened.items() if name.endswith("/metadata")}
    assert json_items == {f"4/{item}/metadata": 1 for item in ("run_info", "data_state", "progress", "fingerprint")}
    assert "2/_CHECKPOINT_METADATA" not in opened and opened["4/_CHECKPOINT_METADATA"] <= 1  # no other step's read


def test_a_record_of_the_resumed_checkpoint_is_read_without_a_manager(finished_run, opened, scans, managers):
    """The checks that compare one entry of the resumed checkpoint's run_info (`stored_record`), or of the one
    `init_weights_from` names (`source_run_info`), read its JSON alone: no manager, no listing, nothing else read."""
    root = finished_run / "checkpoints"
    assert stored_record((root, 4), "arguments")["max_steps"] == 4
    assert source_run_info(str(root / "4"))["arguments"]["max_steps"] == 4
    assert managers == [] and scans == [] and opened == {"4/run_info/metadata": 2}
    assert source_run_info(str(root / "3")) == {}  # not there (a resume's step gone: tests/test_unreadable_records.py)


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


def test_a_save_forgets_what_was_read_of_the_steps_its_retention_may_remove(tmp_path):
    state = {"w": jax.numpy.ones(3)}
    with CheckpointManager(tmp_path, max_to_keep=1, async_save=False, owner=True) as manager:
        manager.save(1, state=state, data_state={}, run_info={})
        assert manager.check_items(1) == frozenset({"data_state", "fingerprint", "progress", "run_info", "state"})
        manager.save(2, state=state, data_state={}, run_info={})  # removes step 1 (max_to_keep)
        with pytest.raises(checkpoint.CheckpointNotFoundError, match=r"step 1 .*available: \[2\]"):
            manager.check_items(1)


def test_a_background_saves_retention_is_not_hidden_by_what_was_read_while_it_was_written(tmp_path, monkeypatch):
    """Retention removes steps once the save in flight is written, after `save` returned: a step read meanwhile is
    not kept as read."""
    state = {"w": jax.numpy.ones(3)}
    with CheckpointManager(tmp_path, max_to_keep=1, async_save=True, owner=True) as manager:
        manager.save(1, state=state, data_state={}, run_info={})
        manager.wait_until_finished()
        written, deleter = threading.Event(), manager._manager._checkpoint_deleter  # Orbax's: removes old steps
        delete_steps = deleter.delete_steps
        monkeypatch.setattr(deleter, "delete_steps", lambda steps: written.wait(60) and delete_steps(steps))
        manager.save(2, state=state, data_state={}, run_info={})  # removes step 1 (max_to_keep) once written
        assert manager.read_run_info(1) == {} and manager.check_items(1)  # still there while step 2 is written
        written.set()
        manager.wait_until_finished()
        with pytest.raises(checkpoint.CheckpointNotFoundError, match=r"step 1 .*available: \[2\]"):
            manager.read_run_info(1)


def test_an_item_gone_since_the_items_were_checked_is_refused_not_read_as_an_older_checkpoints(run_copy):
    """The items are checked once per step; one gone later (a live run's retention removing the step, damage) is
    refused where it is read, as then, not taken for one the checkpoint was written before: its progress silently
    empty, its state restored unverified."""
    root = run_copy / "checkpoints"
    with CheckpointManager(root, read_only=True) as manager:
        target = _metadata_target(manager, 4)
        manager.check_items(4)
        shutil.rmtree(root / "4" / "progress")
        with pytest.raises(MissingItemError, match=r"step 4: its progress/ item is missing"):
            manager.read_progress(4)
        shutil.rmtree(root / "4" / "fingerprint")
        with pytest.raises(MissingItemError, match=r"step 4: its fingerprint/ item is missing"):
            manager.restore_state(4, abstract_state=target)
        shutil.rmtree(root / "4")
        with pytest.raises(checkpoint.CheckpointNotFoundError, match=r"step 4 .*available: \[2\]"):
            manager.read_progress(4)


def test_what_a_manager_returns_is_its_callers_to_change(finished_run):
    """What a manager read once is handed out as copies: a caller's change is not what the next read returns."""
    with CheckpointManager(finished_run / "checkpoints", read_only=True) as manager:
        manager.read_run_info(4)["arguments"]["max_steps"] = 99
        manager.stored_signature(4).clear()
        assert manager.read_run_info(4)["arguments"]["max_steps"] == 4 and manager.stored_signature(4)
