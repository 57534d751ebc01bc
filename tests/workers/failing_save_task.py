"""Tasks whose checkpoint of step 4 cannot be written on one process (`tests/test_multiprocess_save_failure.py`): the
disk of that process is full when Orbax writes its part of the state."""

import jax
from orbax.checkpoint._src.serialization import serialization

from easytrain import BaseTrainer

FAILING_STEP = 4
failing_process: int | None = None  # set by the task built
_write = serialization.async_serialize_from_host


async def _disk_full_at_the_failing_step(*args, **kwargs):
    if jax.process_index() == failing_process and f"/{FAILING_STEP}.orbax-checkpoint-tmp" in f"{args}{kwargs}":
        raise OSError(28, "No space left on device")
    return await _write(*args, **kwargs)


serialization.async_serialize_from_host = _disk_full_at_the_failing_step


class DiskFullOnProcessOne(BaseTrainer):
    """A plain causal LM whose save of step 4 finds the disk of process 1 full."""

    failing = 1

    def __init__(self, *args, **kwargs):
        global failing_process
        failing_process = self.failing
        super().__init__(*args, **kwargs)


class DiskFullOnProcessZero(DiskFullOnProcessOne):
    """The same on process 0, the one that commits the checkpoint and hosts the coordination service."""

    failing = 0
