"""`LoopParts`: every collaborator one training run calls, handed to `TrainLoop` explicitly.

`BaseTrainer.loop_parts` fills it from its hooks; the loop reads only these fields, so it knows no trainer class
and no batch field by name, and a test can drive it with stand-ins.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Callable, Mapping

import jax

from easytrain import throughput
from easytrain.arguments import TrainingArguments
from easytrain.callbacks import CallbackList
from easytrain.checkpoint import CheckpointManager
from easytrain.memory_plan import MemoryPlan
from easytrain.protocol import ConfiguredDataloaders

HostBatch = Mapping[str, Any]


@dataclasses.dataclass
class LoopParts:
    """What one training run uses.

    `iteration(state, device_batch) -> (state, metrics)` is one iteration (by default one compiled
    train step; a subclass may run several updates per batch). `publish(state)` hands the newest state
    to its owner after every iteration, so callbacks and evaluators see it. `owner` is passed to the
    callbacks, which may set `owner.should_stop`. `count_tokens`, `count_token_slots`, `model_flops` and
    `count_samples` read each host batch for the throughput logs (`easytrain.throughput`).
    `plan_memory(state, device_batch)` runs once, before the first iteration: it may compile ahead and check memory
    (`easytrain.memory_plan`).
    `resumed_from`: the checkpoint the run resumed from (None: a fresh run), kept as it is by a stop before step one.
    `settle_claim()`: once the first step is done, delete what the claim of output_dir held of the older run
    (`held_run.HeldRun.settle`); None where it holds nothing.
    """

    arguments: TrainingArguments
    data: ConfiguredDataloaders
    iteration: Callable[[Any, Mapping[str, jax.Array]], tuple[Any, dict[str, Any]]]
    to_device: Callable[[HostBatch], Mapping[str, jax.Array]]
    count_tokens: Callable[[HostBatch], int]
    publish: Callable[[Any], None]
    checkpoints: CheckpointManager
    run_info: Callable[[], dict[str, Any]]
    evaluate: Callable[[], dict[str, float]]
    export: Callable[[Path], Any]
    restore_best: Callable[[int, Any], Any]
    callbacks: CallbackList
    owner: Any
    is_main_process: bool
    count_token_slots: Callable[[HostBatch], tuple[int, int]] = lambda batch: (0, 0)
    model_flops: Callable[[HostBatch], float] = lambda batch: 0.0
    plan_memory: Callable[[Any, Mapping[str, jax.Array]], MemoryPlan | None] = lambda state, batch: None
    resumed_from: str | None = None
    count_samples: Callable[[HostBatch], int] = throughput.batch_rows
    settle_claim: Callable[[], None] | None = None
