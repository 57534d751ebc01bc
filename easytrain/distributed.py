"""Joining a multi-process (multi-host) run: one process per host, JAX's own coordination.

Must run before any other JAX call in the process; `BaseTrainer` calls it first thing.
"""

from __future__ import annotations

import logging
import os

import jax

from easytrain.arguments import TrainingArguments
from easytrain.errors import ArgumentError

logger = logging.getLogger("easytrain")

def _count(variable: str) -> int:
    value = os.environ.get(variable, "")
    return int(value) if value.isdigit() else 1


def auto_detected_cluster() -> str | None:
    """The launcher of a multi-process job that `jax.distributed.initialize()` can join by itself."""
    if _count("SLURM_NTASKS") > 1:
        return "SLURM"
    if _count("OMPI_COMM_WORLD_SIZE") > 1:
        return "Open MPI"
    if "," in os.environ.get("TPU_WORKER_HOSTNAMES", ""):
        return "Cloud TPU (multi-host)"
    return None


def initialize(args: TrainingArguments) -> None:
    """Call `jax.distributed.initialize` when the run spans several processes; otherwise do nothing."""
    if jax.distributed.is_initialized():
        return
    explicit = (args.coordinator_address, args.num_processes, args.process_id)
    if any(value is not None for value in explicit):
        if None in explicit:
            raise ArgumentError("coordinator_address", "a multi-process run needs coordinator_address, "
                                "num_processes and process_id together (or none, to auto-detect).")
        if args.num_processes < 1:
            raise ArgumentError("num_processes", f"must be at least 1, got {args.num_processes}.")
        if not 0 <= args.process_id < args.num_processes:
            raise ArgumentError("process_id", f"is {args.process_id}, but with num_processes={args.num_processes} "
                                f"each process needs a distinct id from 0 to {args.num_processes - 1}.")
        jax.distributed.initialize(coordinator_address=args.coordinator_address,
                                   num_processes=args.num_processes, process_id=args.process_id)
    elif (cluster := auto_detected_cluster()) is not None:
        logger.info("detected a %s launch; joining it with jax.distributed.initialize()", cluster)
        jax.distributed.initialize()
    else:
        return
    logger.info("process %d of %d, %d local / %d global devices", jax.process_index(), jax.process_count(),
                jax.local_device_count(), jax.device_count())


def barrier(name: str) -> None:
    """Wait until every process reaches this point (no-op in a single-process run)."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)
