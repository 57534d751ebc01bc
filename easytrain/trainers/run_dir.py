"""The output directory of a run: checked before any compute, never clobbered by accident."""

from __future__ import annotations

import logging
import shutil
import time
import uuid
from pathlib import Path

from easytrain import distributed
from easytrain.arguments import TrainingArguments
from easytrain.checkpoint import CHECKPOINTS_DIRNAME, finalized_steps, resolve_checkpoint
from easytrain.errors import OutputDirError
from easytrain.jobs import JOB_FILENAME, current_job

#: What a run leaves in its output_dir that a later fresh run would overwrite or mix with its own.
PREVIOUS_RUN_OUTPUTS = ("final_model", "results.json", "metrics.jsonl", "metrics.csv", "tensorboard")
#: What `overwrite_output_dir` removes: the previous run, so nothing of it is mistaken for the new one's.
RUN_ARTIFACTS = (CHECKPOINTS_DIRNAME, *PREVIOUS_RUN_OUTPUTS, JOB_FILENAME)
SUPERSEDED_DIRNAME = "superseded_checkpoints"

logger = logging.getLogger("easytrain")


def check_writable(directory: Path) -> None:
    try:
        directory.mkdir(parents=True, exist_ok=True)
        probe = directory / f".write-probe-{uuid.uuid4().hex}"
        probe.write_text("")
        probe.unlink()
    except OSError as error:
        raise OutputDirError(f"output_dir: cannot write to {str(directory)!r} ({error.strerror}); "
                             "choose a writable --output_dir.") from error


def check_output_dir(args: TrainingArguments, *, is_main_process: bool = True) -> tuple[Path, int] | None:
    """Validate `output_dir` and `resume_from_checkpoint`; return the checkpoint to resume, if any.

    Only checks: nothing is moved or removed here (`claim_output_dir` does that once the run has passed
    every other check). A directory holding another run's checkpoints, exported model or logs is refused
    unless the run is resumed or `overwrite_output_dir` is set.
    """
    output_dir = Path(args.output_dir)
    resume = resolve_checkpoint(output_dir, args.resume_from_checkpoint)
    if is_main_process:
        check_writable(output_dir)
    if resume is not None:
        return resume
    if args.overwrite_output_dir:
        return None
    existing = finalized_steps(output_dir / CHECKPOINTS_DIRNAME)
    if existing:
        raise OutputDirError(
            f"output_dir: {str(output_dir)!r} already holds a run with checkpoints at steps {existing}. "
            "Pass --resume_from_checkpoint latest to continue it, --overwrite_output_dir to start over "
            "(removes those checkpoints), or choose another --output_dir.")
    if found := [name for name in PREVIOUS_RUN_OUTPUTS if (output_dir / name).exists()]:
        raise OutputDirError(
            f"output_dir: {str(output_dir)!r} holds another run's {', '.join(found)} (and no checkpoint to "
            "resume). Pass --overwrite_output_dir to start over (removes them), or choose another --output_dir.")
    return None


def claim_run(args: TrainingArguments, resume: tuple[Path, int] | None, is_main_process: bool) -> None:
    """Process 0 claims `output_dir` (`claim_output_dir`); the others wait until it has."""
    if is_main_process:
        claim_output_dir(args, resume)
    distributed.barrier("easytrain:output_dir")  # process 0 may have cleared or moved checkpoints


def claim_output_dir(args: TrainingArguments, resume: tuple[Path, int] | None) -> None:
    """Make `output_dir` this run's, on the main process, right before its first write: a resumed run moves
    its newer checkpoints aside (`set_aside_newer_checkpoints`); a fresh run under `overwrite_output_dir`
    removes the previous run's checkpoints, logs and export. Called after the data, model and steps are checked,
    so a run refused for bad input leaves the old one whole."""
    output_dir = Path(args.output_dir)
    if resume is not None:
        set_aside_newer_checkpoints(output_dir, *resume)
    elif args.overwrite_output_dir:
        for name in RUN_ARTIFACTS:
            if name == JOB_FILENAME and _job_reports_into(output_dir):
                continue  # the live job's record (the CLI opens it before training), not the old run's
            target = output_dir / name
            if target.is_dir():
                shutil.rmtree(target)
            elif target.exists():
                target.unlink()


def _job_reports_into(output_dir: Path) -> bool:
    running = current_job()
    return running is not None and running.output_dir.resolve() == output_dir.resolve()


def set_aside_newer_checkpoints(output_dir: Path, root: Path, step: int) -> list[Path]:
    """Resuming an older step of this run: move its newer checkpoints out of the way, never delete them.

    Left in place, they would be resumed by the next `latest` instead of the continued run, and would
    block its saves. They go to `output_dir/superseded_checkpoints/<time>/<step>`.
    """
    if root.resolve() != (output_dir / CHECKPOINTS_DIRNAME).resolve():
        return []
    complete = set(finalized_steps(root))
    # Incomplete step directories too (a damaged copy, no state): left in place, they would block that step's save.
    newer = sorted(int(d.name) for d in root.iterdir() if d.name.isdigit() and d.is_dir() and int(d.name) > step)
    if not newer:
        return []
    destination = output_dir / SUPERSEDED_DIRNAME / time.strftime("%Y%m%d-%H%M%S")
    destination.mkdir(parents=True, exist_ok=True)
    moved = [Path(shutil.move(str(root / str(s)), str(destination / str(s)))) for s in newer]
    if incomplete := [s for s in newer if s not in complete]:
        logger.warning("%s holds incomplete checkpoint(s) at step(s) %s (not resumable: an item is missing)",
                       root, incomplete)
    logger.warning("resuming step %d of %s: moved its newer checkpoint directories %s to %s", step, root, newer,
                   destination)
    return moved
