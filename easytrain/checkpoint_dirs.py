"""Where checkpoints live: which ``<step>`` directories are complete, and what a ``resume_from_checkpoint``
setting points at. Kept apart from the manager so these checks need no Orbax manager of their own."""

from __future__ import annotations

import asyncio
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


def _holds_items(step_dir: Path) -> bool:
    """A ``<step>`` directory holding this library's items (finalized or not: `_finalized` tells)."""
    return (
        step_dir.name.isdigit()
        and step_dir.is_dir()
        and (step_dir / "state").is_dir()
        and (step_dir / "run_info").is_dir()
    )


def _finalized(step_dirs: list[Path]) -> list[bool]:
    """Orbax's `is_path_finalized` of each of `step_dirs`, checked on one event loop: Orbax runs each synchronous
    call on an event loop of its own (1-2 ms to make and close), and a resume lists the checkpoints several times.
    An Orbax without the asynchronous check it wraps is asked a directory at a time."""
    check, run_sync = (getattr(getattr(ocp.step, "temporary_paths", None), "is_path_finalized", None),
                       getattr(getattr(ocp.step, "asyncio_utils", None), "run_sync", None))
    if not step_dirs or check is None or run_sync is None:
        return [ocp.step.is_path_finalized(step_dir) for step_dir in step_dirs]

    async def all_finalized() -> list[bool]:
        return list(await asyncio.gather(*(check(step_dir) for step_dir in step_dirs)))

    return run_sync(all_finalized())


def is_checkpoint(step_dir: Path) -> bool:
    """True for a finalized ``<step>`` directory holding this library's items."""
    return _holds_items(step_dir) and _finalized([step_dir])[0]


def finalized_steps(directory: str | os.PathLike) -> list[int]:
    """Steps of the complete checkpoints under ``directory``, ascending.

    Half-written (tmp) directories left by a killed save are ignored.
    """
    root = Path(directory)
    if not root.is_dir():
        return []
    candidates = [child for child in root.iterdir() if _holds_items(child)]
    return sorted(int(child.name) for child, done in zip(candidates, _finalized(candidates)) if done)


def _not_found(value: Any, problem: str) -> CheckpointNotFoundError:
    latest = " or 'latest'" if not asks_latest(value) else ""
    return CheckpointNotFoundError(
        f"resume_from_checkpoint={value!r}: {problem}. Pass a step directory such as "
        f"'<output_dir>/{CHECKPOINTS_DIRNAME}/<step>'{',' if latest else ' or'} a '{CHECKPOINTS_DIRNAME}' "
        f"directory{',' if latest else ''}{latest}; leave resume_from_checkpoint unset to start from scratch."
    )


def asks_latest(value: Any) -> bool:
    """Whether a `resume_from_checkpoint` value asks for the newest checkpoint (`True`, or one of `LATEST_ALIASES`)."""
    return value is True or (isinstance(value, str) and value.lower() in LATEST_ALIASES)


def _relative_note(output_dir: str | os.PathLike) -> str:
    """Why `latest` found nothing where a relative output_dir was given from another working directory (a
    `--config <run>/arguments.json` run elsewhere): it names the directory the path was resolved against."""
    if Path(output_dir).is_absolute():
        return ""
    return (f": output_dir {str(output_dir)!r} is relative: it was resolved against the working directory "
            f"{Path.cwd()}. Run from the directory the run was started in, or give --output_dir as an absolute path: "
            f"the run's directory, the one holding its arguments.json and {CHECKPOINTS_DIRNAME}/")


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
    if asks_latest(value):
        root = Path(output_dir).absolute() / CHECKPOINTS_DIRNAME
        steps = finalized_steps(root)
        if not steps:
            raise _not_found(value, f"no complete checkpoint under {root}{_relative_note(output_dir)}")
        return root, steps[-1]
    path = Path(value).expanduser().absolute()
    if not path.exists():
        raise _not_found(value, f"{path} does not exist")
    if is_checkpoint(path):
        return path.parent, int(path.name)
    for root in (path, path / CHECKPOINTS_DIRNAME):
        if steps := finalized_steps(root):
            return root, steps[-1]
    raise _not_found(value, f"{path} is not a complete checkpoint and contains none")
