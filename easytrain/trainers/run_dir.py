"""The output directory of a run: checked before any compute, never clobbered by accident."""

from __future__ import annotations

import shutil
import uuid
from pathlib import Path

from easytrain.arguments import TrainingArguments
from easytrain.checkpoint import CHECKPOINTS_DIRNAME, finalized_steps, resolve_checkpoint
from easytrain.errors import OutputDirError

RUN_ARTIFACTS = (CHECKPOINTS_DIRNAME, "tensorboard", "metrics.jsonl")


def check_writable(directory: Path) -> None:
    try:
        directory.mkdir(parents=True, exist_ok=True)
        probe = directory / f".write-probe-{uuid.uuid4().hex}"
        probe.write_text("")
        probe.unlink()
    except OSError as error:
        raise OutputDirError(f"output_dir: cannot write to {str(directory)!r} ({error.strerror}); "
                             "choose a writable --output_dir.") from error


def prepare_output_dir(args: TrainingArguments, *, is_main_process: bool = True) -> tuple[Path, int] | None:
    """Validate `output_dir` and `resume_from_checkpoint`; return the checkpoint to resume, if any.

    A directory holding another run's checkpoints is refused unless the run is resumed or
    `overwrite_output_dir` is set (which removes that run's checkpoints and logs).
    """
    output_dir = Path(args.output_dir)
    resume = resolve_checkpoint(output_dir, args.resume_from_checkpoint)
    if is_main_process:
        check_writable(output_dir)
    if resume is not None:
        return resume
    existing = finalized_steps(output_dir / CHECKPOINTS_DIRNAME)
    if existing and not args.overwrite_output_dir:
        raise OutputDirError(
            f"output_dir: {str(output_dir)!r} already holds a run with checkpoints at steps {existing}. "
            "Pass --resume_from_checkpoint latest to continue it, --overwrite_output_dir to start over "
            "(removes those checkpoints), or choose another --output_dir.")
    if args.overwrite_output_dir and is_main_process:
        for name in RUN_ARTIFACTS:
            target = output_dir / name
            if target.is_dir():
                shutil.rmtree(target)
            elif target.exists():
                target.unlink()
    return None
