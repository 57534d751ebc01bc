"""A checkpoint read that fails (a flipped byte in a compressed chunk) is refused with its one error: Orbax's other
reads of that restore end before its event loop closes, so TensorStore does not call back into the closed
loop once each completes (a `RuntimeError: Event loop is closed` traceback apiece, dozens of them, before)."""

from __future__ import annotations

import asyncio
import sys
import threading
from pathlib import Path

import jax
import jax.numpy as jnp
import pytest
from orbax.checkpoint._src import asyncio_utils

from easytrain.checkpoint import CheckpointManager

STATE = {f"w{i}": jnp.arange(2048.0) * i for i in range(40)}


def test_a_failed_orbax_run_ends_its_other_tasks_before_its_loop_closes(tmp_path: Path) -> None:
    CheckpointManager(tmp_path, read_only=True).close()  # any manager: Orbax's runs cancel what they leave
    release, tasks = threading.Event(), []

    async def read() -> None:  # a read still waiting on TensorStore when the other fails
        await asyncio.get_running_loop().run_in_executor(None, release.wait, 10)

    async def restore() -> None:
        tasks.append(asyncio.ensure_future(read()))
        await asyncio.sleep(0)
        raise ValueError("DATA_LOSS: Error decoding chunk")

    threading.Timer(0.2, release.set).start()  # the read completes after the failure
    with pytest.raises(ValueError, match="DATA_LOSS"):
        asyncio_utils.run_sync(restore())
    assert tasks[0].done()  # ended before its loop closed; not left pending on it


def test_a_leftover_task_that_does_not_end_is_cancelled() -> None:
    """One waiting on something that never comes (another process's barrier) does not hold the failure up."""
    from easytrain.orbax_loops import end_pending

    loop = asyncio.new_event_loop()
    never = loop.create_future()
    task = loop.create_task(asyncio.wait_for(never, None))
    end_pending(loop, timeout=0.1)
    loop.close()
    assert task.cancelled()


def flip_a_byte_of_a_chunk(step_dir: Path) -> None:
    """One bit of one of the state's OCDBT files (their names are random: a data file or a b-tree node)."""
    chunk = sorted((step_dir / "state" / "d").iterdir())[0]
    data = bytearray(chunk.read_bytes())
    data[len(data) // 2] ^= 0x01
    chunk.write_bytes(bytes(data))


def test_a_damaged_chunk_is_refused_without_event_loop_tracebacks(tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    with CheckpointManager(tmp_path, owner=True) as manager:
        manager.save(1, state=STATE, data_state={}, run_info={})
    flip_a_byte_of_a_chunk(tmp_path / "1")
    unraisable = []
    monkeypatch.setattr(sys, "unraisablehook", unraisable.append)
    target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), STATE)
    for _ in range(5):  # the leftover reads complete after the loop closed about every other time
        with CheckpointManager(tmp_path, read_only=True) as reader, \
                pytest.raises(Exception, match="DATA_LOSS|Error decoding|Error reading"):  # a data or b-tree file
            reader.restore(1, abstract_state=target)
        threading.Event().wait(0.2)  # time for the callbacks of leftover reads to arrive (there are none)
    assert [f"{u.exc_type.__name__}: {u.exc_value}" for u in unraisable] == []
