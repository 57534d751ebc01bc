"""Where checkpoints live: which ``<step>`` directories are complete, and what a ``resume_from_checkpoint``
setting points at. Kept apart from the manager so these checks need no Orbax manager of their own."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import orbax.checkpoint as ocp

from easytrain.errors import EasytrainError

CHECKPOINTS_DIRNAME = "checkpoints"
LATEST_ALIASES = frozenset({"true", "latest"})
_DISABLED_ALIASES = frozenset({"false", "none", ""})


class CheckpointNotFoundError(EasytrainError, FileNotFoundError):
    """The requested checkpoint does not exist or is not a complete checkpoint."""


def _is_checkpoint(step_dir: Path) -> bool:
    """True for a finalized ``<step>`` directory holding this library's items."""
    return (
        step_dir.name.isdigit()
        and step_dir.is_dir()
        and ocp.step.is_path_finalized(step_dir)
        and (step_dir / "state").is_dir()
        and (step_dir / "run_info").is_dir()
    )


def finalized_steps(directory: str | os.PathLike) -> list[int]:
    """Steps of the complete checkpoints under ``directory``, ascending.

    Half-written (tmp) directories left by a killed save are ignored.
    """
    root = Path(directory)
    if not root.is_dir():
        return []
    return sorted(int(child.name) for child in root.iterdir() if _is_checkpoint(child))


def _not_found(value: Any, problem: str) -> CheckpointNotFoundError:
    return CheckpointNotFoundError(
        f"resume_from_checkpoint={value!r}: {problem}. Pass a step directory such as "
        f"'<output_dir>/{CHECKPOINTS_DIRNAME}/<step>', a '{CHECKPOINTS_DIRNAME}' directory, "
        "or 'latest'; leave resume_from_checkpoint unset to start from scratch."
    )


def resolve_checkpoint(
    output_dir: str | os.PathLike, resume_from_checkpoint: str | os.PathLike | bool | None
) -> tuple[Path, int] | None:
    """Turns a ``resume_from_checkpoint`` setting into a checkpoint to restore.

    Args:
        output_dir: The run's output directory; ``True``/``"latest"`` look in
            ``output_dir/checkpoints``.
        resume_from_checkpoint: ``None``/``False`` (no resume), ``True``/``"true"``/
            ``"latest"``, or a path to a step directory, a checkpoints directory
            or an output directory.

    Returns:
        ``(checkpoints_dir, step)`` of a complete checkpoint, or None for no resume.

    Raises:
        CheckpointNotFoundError: the path does not exist or holds no complete checkpoint.
    """
    value = resume_from_checkpoint
    if value is None or value is False or (isinstance(value, str) and value.lower() in _DISABLED_ALIASES):
        return None
    if value is True or (isinstance(value, str) and value.lower() in LATEST_ALIASES):
        root = Path(output_dir).absolute() / CHECKPOINTS_DIRNAME
        steps = finalized_steps(root)
        if not steps:
            raise _not_found(value, f"no complete checkpoint under {root}")
        return root, steps[-1]
    path = Path(value).expanduser().absolute()
    if not path.exists():
        raise _not_found(value, f"{path} does not exist")
    if _is_checkpoint(path):
        return path.parent, int(path.name)
    for root in (path, path / CHECKPOINTS_DIRNAME):
        if steps := finalized_steps(root):
            return root, steps[-1]
    raise _not_found(value, f"{path} is not a complete checkpoint and contains none")
