"""What the compiled train step holds on each device, read from XLA before the first step runs.

XLA fixes at compile time how many bytes a program's arguments, outputs and temporaries take on each
device (its buffer assignment, `Compiled.memory_analysis()`). The trainer compiles its train step ahead of
the first call (the call then reuses that executable), logs the plan, and refuses a step that cannot fit
in what the device has free, naming the settings that shrink it, instead of an allocator error once the
run is under way. Backends whose allocator reports no limit (CPU) get the plan without the check.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Iterable, Mapping

import jax

from easytrain.errors import DeviceMemoryError

MIB, GIB = 2**20, 2**30
#: What shrinks a train step's memory, in the order to try it.
FIXES = ("lower train_batch_size (raise gradient_accumulation_steps to keep the global batch), set "
         "remat_policy='full' (or 'dots'), set loss_chunk_size for a large vocabulary, or shard the state over "
         "more devices (fsdp_size)")


@dataclasses.dataclass(frozen=True)
class MemoryPlan:
    """Bytes one compiled program uses per device (XLA's buffer assignment of the per-device program)."""

    arguments: int  # the state and the batch: resident before the call
    outputs: int
    donated: int  # output bytes written into donated argument buffers (the updated state)
    temporaries: int  # activations, gradients, optimizer scratch
    code: int

    @property
    def added(self) -> int:
        """What a call allocates beyond its arguments: outputs not written over them, temporaries, code."""
        return self.outputs - self.donated + self.temporaries + self.code

    @property
    def peak(self) -> int:
        """The most the call holds at once: its arguments plus what it adds."""
        return self.arguments + self.added

    def logs(self) -> dict[str, float]:
        """The plan as metrics of the first log record, in MiB per device."""
        return {"planned_memory_mib": round(self.peak / MIB, 2), "planned_temp_mib": round(self.temporaries / MIB, 2)}

    def describe(self) -> str:
        return (f"{self.peak / GIB:.2f} GiB per device (arguments {self.arguments / GIB:.2f}, of which "
                f"{self.donated / GIB:.2f} donated to the outputs; temporaries {self.temporaries / GIB:.2f})")


def plan_of(compiled: jax.stages.Compiled) -> MemoryPlan | None:
    """The plan of a compiled program; None where the backend does not analyse memory."""
    analysis = compiled.memory_analysis()
    if analysis is None:
        return None
    return MemoryPlan(arguments=analysis.argument_size_in_bytes, outputs=analysis.output_size_in_bytes,
                      donated=analysis.alias_size_in_bytes, temporaries=analysis.temp_size_in_bytes,
                      code=analysis.generated_code_size_in_bytes)


@dataclasses.dataclass(frozen=True)
class Headroom:
    """The tightest local device's allocator figures, in bytes."""

    device: str
    limit: int
    in_use: int

    @property
    def free(self) -> int:
        return self.limit - self.in_use


def headroom(devices: Iterable[Any]) -> Headroom | None:
    """Free memory of the local device with the least of it; None if any reports no limit (CPU)."""
    rooms = []
    for device in devices:
        stats = device.memory_stats()
        if not stats or "bytes_limit" not in stats:
            return None
        rooms.append(Headroom(str(device), int(stats["bytes_limit"]), int(stats.get("bytes_in_use", 0))))
    return min(rooms, key=lambda room: room.free, default=None)


def check_fits(plan: MemoryPlan, room: Headroom | None) -> None:
    """Raise `DeviceMemoryError` when `plan` adds more than `room` has free (its arguments already sit there)."""
    if room is None or plan.added <= room.free:
        return
    raise DeviceMemoryError(
        f"the train step needs {plan.added / GIB:.2f} GiB per device beyond its inputs (outputs "
        f"{(plan.outputs - plan.donated) / GIB:.2f} not donated, temporaries {plan.temporaries / GIB:.2f}), but "
        f"{room.device} has {room.free / GIB:.2f} GiB free of {room.limit / GIB:.2f} GiB ({room.in_use / GIB:.2f} "
        f"in use, the state and the batch among it). Nothing has run and no checkpoint was written. To fit: "
        f"{FIXES}.")


def local(devices: Iterable[Any]) -> list[Any]:
    """The `devices` this process drives: the ones whose free memory it can read."""
    return [device for device in devices if device.process_index == jax.process_index()]


def compile_ahead(step: Any, state: Any, batch: Any, devices: Iterable[Any]) -> MemoryPlan | None:
    """Compile the jitted `step` for `(state, batch)` now (its first call then reuses the executable: `jax.jit`
    caches the lowering and its compilation), check that it fits the local `devices`, and return its plan.
    None, with nothing compiled, for a step that is not a `jax.jit` function."""
    if not hasattr(step, "lower"):
        return None
    plan = plan_of(step.lower(state, batch).compile())
    if plan is not None:
        check_fits(plan, headroom(local(devices)))
    return plan


def worst_case(batch: Mapping[str, Any], length: int, devices: Iterable[Any]) -> Mapping[str, Any]:
    """The batch to plan a run that pads to buckets for: `stretched` to its longest bucket, the most memory a
    batch can take, where the local `devices` report a limit to check that against; elsewhere (CPU) `batch`
    itself, whose program the first step runs, rather than compiling a shape that may never come only to log it."""
    return batch if headroom(local(devices)) is None else stretched(batch, length)


def stretched(batch: Mapping[str, Any], length: int) -> Mapping[str, Any]:
    """`batch` with its sequence axis (the last axis of every field as long as `input_ids`'s) at `length`, as
    shapes: the largest batch a run that pads to buckets can feed its step, which is the one to plan for."""
    current = batch["input_ids"].shape[-1]
    if current == length:
        return batch
    return {key: jax.ShapeDtypeStruct(value.shape[:-1] + (length,) if value.shape[-1:] == (current,) else value.shape,
                                      value.dtype, sharding=value.sharding) for key, value in batch.items()}
