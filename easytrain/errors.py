"""Errors raised before any compute starts. Each names the offending field and the fix."""

from __future__ import annotations


class EasytrainError(Exception):
    """Base class of every error easytrain raises on purpose."""


class ArgumentError(EasytrainError, ValueError):
    """A `TrainingArguments` field (or command-line flag) has a bad value."""

    def __init__(self, field: str, message: str):
        self.field, self.message = field, message
        super().__init__(f"{field}: {message}")


class MeshError(EasytrainError, ValueError):
    """The mesh `configure_mesh` returned cannot hold easytrain's layouts (its axes or their types)."""


class OutputDirError(EasytrainError, ValueError):
    """The output directory holds another run, or cannot be written."""


class NonFiniteLossError(EasytrainError, FloatingPointError):
    """Training produced a NaN/Inf loss or gradient under `non_finite_policy='stop'`."""


class CheckpointReadError(EasytrainError, OSError, ValueError):
    """A complete-looking checkpoint could not be read (corrupted, truncated or unreadable files). Also a `ValueError`,
    the JSON decoder's error a damaged record raised before it was named, so code catching either still catches it."""


class CheckpointWriteError(EasytrainError, OSError):
    """A checkpoint could not be written (a full disk): the run stops there; the checkpoints before it are intact.
    `step`: the step whose save failed; `latest`: the newest complete checkpoint (None: none yet)."""

    def __init__(self, message: str, *, step: int | None = None, latest: int | None = None):
        super().__init__(message)
        self.step, self.latest = step, latest


class DeviceMemoryError(EasytrainError, MemoryError):
    """A compiled step needs more device memory than the device has free (`easytrain.memory_plan`)."""


class TrainedAlreadyError(EasytrainError, RuntimeError):
    """`train()` was called again on a trainer whose `train()` already trained."""
