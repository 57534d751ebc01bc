"""The claim of an output directory: `train()` takes it for its run, under the lock, once every check has passed.

Process 0 locks the directory (`run_lock`), checks it again (another run may have trained there since the trainer
was built: `recheck_output_dir`) and makes it this run's (`claim_output_dir`): a resume of an older step sets its
newer checkpoints aside, a run under `overwrite_output_dir` removes the older run's; every move is recorded in a
`held_run.HeldRun`, put back if the run ends before its first step is done. The other processes take process 0's
decision (`claim_run`). What the directory must hold to be claimed at all is `run_dir.check_output_dir`'s.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from easytrain.arguments import TrainingArguments
from easytrain.checkpoint import CHECKPOINTS_DIRNAME, CheckpointNotFoundError, finalized_steps
from easytrain.config_io import ARGUMENTS_FILE
from easytrain.errors import OutputDirError
from easytrain.jobs import JOB_FILENAME, current_job
from easytrain.trainers import run_dir, run_lock
from easytrain.trainers.held_run import LEFTOVER_KINDS, REWRITTEN_LOGS, HeldRun, held_leftovers, leftover_kind
from easytrain.trainers.run_dir import (FINAL_OUTPUTS, RUN_ARTIFACTS, STARTED_RUN_LOGS, SUPERSEDED_DIRNAME,
                                        _checked_directory, restarts_unsaved_run, resumes_own_checkpoints,
                                        step_dirs)
from easytrain.trainers.start_agreement import decoded, encoded

logger = logging.getLogger("easytrain")


def claim_run(args: TrainingArguments, resume: tuple[Path, int] | None, is_main_process: bool,
              broadcast: Broadcast | None = None, held: HeldRun | None = None,
              outputs: Sequence[str] = ()) -> HeldRun:
    """Process 0 locks `output_dir` for this run (`run_lock`), checks it again (`recheck_output_dir`) and claims it
    (`claim_output_dir`); the others wait until it has, and take its decision: where it refused (or failed), every
    process raises an `OutputDirError` with its message. `broadcast` sends process 0's array to all
    (`multihost_utils.broadcast_one_to_all` in a multi-process run). Returns what process 0's claim holds (empty on
    the others), for the run to `settle` once its first step is done, or `undo` if it ends before: `held`, where
    given, filled as the claim moves (a process ended in the collective below can give it back). `outputs`: the
    trainer's own files it writes once it has claimed (`claim_output_dir`)."""
    failure: Exception | None = None
    held = held if held is not None else HeldRun(Path(args.output_dir))
    if is_main_process:
        try:
            run_lock.acquire(args.output_dir)
            try:
                recheck_output_dir(args, resume)
                claim_output_dir(args, resume, held, outputs)
            except BaseException:
                run_lock.release(args.output_dir)
                raise
        except Exception as error:  # told to the other processes, then raised
            failure = error
    try:
        message = _from_process_0(_refusal(failure), broadcast)  # a collective: process 0 has claimed, or refused
    except BaseException:
        held.undo()
        raise
    if failure is not None:
        raise failure
    if message:
        raise OutputDirError(message)
    return held


def recheck_output_dir(args: TrainingArguments, resume: tuple[Path, int] | None) -> None:
    """At `train()`, under the lock: the directory must still allow what `check_output_dir` decided when the trainer
    was built. Another run may have trained there since (trainers of a sweep built side by side on an empty
    directory): the same `OutputDirError` as a trainer built now would get, or, where a resume now resolves
    otherwise (`latest` finds a newer step), a refusal naming both. Nothing is written before it."""
    try:
        now = _checked_directory(args, is_main_process=True)
    except CheckpointNotFoundError as error:
        raise OutputDirError(f"output_dir: {str(args.output_dir)!r} changed since this trainer was built (another "
                             f"run wrote there): {error}") from error
    if _same_resume(now, resume):
        return
    raise OutputDirError(
        f"output_dir: {str(args.output_dir)!r} changed since this trainer was built (another run trained there): "
        f"it was to {_describe(resume)}, it would now {_describe(now)}, and this trainer was set up for the former. "
        "Build a new trainer to decide again (resume_from_checkpoint='latest' continues the run there), or choose "
        "another --output_dir.")


Broadcast = Callable[[np.ndarray], np.ndarray]


def _refusal(error: Exception | None) -> str:
    """What the other processes raise for process 0's failure to claim: its message ('' for none)."""
    if error is None or isinstance(error, OutputDirError):
        return "" if error is None else str(error)
    return f"output_dir: process 0 could not claim it: {type(error).__name__}: {error}"


def _from_process_0(message: str, broadcast: Broadcast | None) -> str:
    """Process 0's `message`, on every process (one small collective; nothing to send in a single process)."""
    if broadcast is None:
        if _process_count() <= 1:
            return message
        from jax.experimental import multihost_utils

        broadcast = multihost_utils.broadcast_one_to_all
    return decoded(np.asarray(broadcast(encoded(message))).reshape(-1))


def _process_count() -> int:
    import jax

    return jax.process_count()


def _same_resume(a: tuple[Path, int] | None, b: tuple[Path, int] | None) -> bool:
    if a is None or b is None:
        return a is b
    return a[0].resolve() == b[0].resolve() and a[1] == b[1]


def _describe(resume: tuple[Path, int] | None) -> str:
    return "start a fresh run" if resume is None else f"resume step {resume[1]} of {resume[0]}"


def claim_output_dir(args: TrainingArguments, resume: tuple[Path, int] | None,
                     held: HeldRun | None = None, outputs: Sequence[str] = ()) -> HeldRun:
    """Make `output_dir` this run's, on the main process, right before its first write: a run resuming its own
    checkpoints moves the newer ones aside (`set_aside_newer_checkpoints`); one resumed from a checkpoint outside
    moves every checkpoint there aside (`check_output_dir` required `overwrite_output_dir` for complete ones); a
    fresh run under `overwrite_output_dir` removes the previous run's checkpoints. Both of the last remove its
    logs and export under `overwrite_output_dir`. Called after the data, model and steps are checked, so a run
    refused for bad input leaves the old one whole; and nothing is gone for good before the run's first step is
    done: the `HeldRun` returned (`held`, where given) puts it all back (`undo`) or deletes what was removed
    (`settle`). `outputs`, the files the trainer writes in output_dir once it has claimed it (SFT's data stats), are
    held as its arguments.json is: wherever the run does not continue its own checkpoints, alone too (a fresh run
    into a directory that holds nothing else of an older run)."""
    output_dir = Path(args.output_dir)
    held = held if held is not None else HeldRun(output_dir)
    if leftovers := held_leftovers(output_dir):
        held.leftovers = _note_leftovers(output_dir, leftovers, args.overwrite_output_dir)
    held.note_absent([output_dir / name for name in (*RUN_ARTIFACTS, ARGUMENTS_FILE, *outputs) if name != JOB_FILENAME])
    try:  # a move refused midway (permissions) puts back those made: the older run stays whole in its place
        _claim_into(held, args, resume)
        # The files the run replaces whole as it starts (its arguments, the trainer's `outputs`) are another run's
        # wherever it does not continue its own checkpoints: held even where nothing else of that run is there.
        replaced = (ARGUMENTS_FILE, *outputs) if held or not resumes_own_checkpoints(output_dir, resume) else ()
        if held:  # the logs a resumed run rewrites: put back by `undo` too
            replaced += REWRITTEN_LOGS
            held.list_entries(output_dir / "tensorboard")
        for name in replaced:
            held.copy(output_dir / name)
    except BaseException:
        held.undo()
        raise
    return held


def _note_leftovers(output_dir: Path, leftovers: list[Path], overwrite: bool) -> list[Path]:
    """Name what earlier claims left in `replaced_run/`, by kind (`held_run.LEFTOVER_KINDS`); return those this
    claim's `settle` deletes: all under `overwrite_output_dir`, else those already being deleted."""
    kinds = {path: leftover_kind(path) for path in leftovers}
    for kind, what in LEFTOVER_KINDS.items():
        if paths := [str(path) for path in leftovers if kinds[path] == kind]:
            removed = overwrite and kind != "deleting"
            logger.warning("%s holds %s: %s%s", output_dir, paths, what,
                           " (deleted once this run's first step is done: overwrite_output_dir)" if removed else "")
    return [path for path in leftovers if overwrite or kinds[path] == "deleting"]


def _claim_into(held: HeldRun, args: TrainingArguments, resume: tuple[Path, int] | None) -> None:
    """`claim_output_dir`'s moves, each recorded in `held`."""
    output_dir = Path(args.output_dir)
    if resumes_own_checkpoints(output_dir, resume):
        set_aside_newer_checkpoints(output_dir, *resume, held=held)
        return
    if resume is not None:
        set_aside(output_dir, step_dirs(output_dir / CHECKPOINTS_DIRNAME),
                  f"resuming {resume[0] / str(resume[1])} (a checkpoint from outside this output_dir)", held=held)
    elif restarts_unsaved_run(args):
        start_over(output_dir, held, keep_links=not args.overwrite_output_dir)
    if args.overwrite_output_dir:
        for name in RUN_ARTIFACTS:
            if name == JOB_FILENAME and _job_reports_into(output_dir):
                continue  # the live job's record (the CLI opens it before training), not the old run's
            held.remove(output_dir / name)


def start_over(output_dir: Path, held: HeldRun | None = None, keep_links: bool = True) -> None:
    """A run stopped before its first complete checkpoint starts again from step 0: its incomplete step directories
    are set aside (one would block that step's save), its logs removed (their steps are trained again); a log that
    is a link (kept on another disk) stays one, what it leads to emptied (the run logs there again: a file's bytes,
    what a run writes in a folder, never another's entries there: `HeldRun.empty_through_link`), unless not
    `keep_links` (`overwrite_output_dir` moves the links away, their targets left as they are); `held` records all
    of it (`claim_output_dir`)."""
    held = held if held is not None else HeldRun(output_dir)
    set_aside(output_dir, step_dirs(output_dir / CHECKPOINTS_DIRNAME), "starting over (no complete checkpoint)",
              held=held)
    linked = [name for name in STARTED_RUN_LOGS
              if keep_links and (output_dir / name).is_symlink() and (output_dir / name).exists()]
    removed = [name for name in STARTED_RUN_LOGS if run_dir.present(output_dir / name) and name not in linked]
    for name in linked:
        held.empty_through_link(output_dir / name)
    for name in removed:
        held.remove(output_dir / name)
    logger.warning("resume_from_checkpoint=latest: %s holds no complete checkpoint yet (its run stopped before the "
                   "first save), so the run starts over from step 0%s%s", output_dir,
                   f"; removed its logs {removed}" if removed else "",
                   f"; emptied its logs {linked} through their links" if linked else "")


def _job_reports_into(output_dir: Path) -> bool:
    running = current_job()
    return running is not None and running.output_dir.resolve() == output_dir.resolve()


def set_aside_newer_checkpoints(output_dir: Path, root: Path, step: int, held: HeldRun | None = None) -> list[Path]:
    """Resuming an older step of this run: move its newer checkpoints out of the way, never delete them, and with
    them the outputs of that lineage's end (`FINAL_OUTPUTS`): its export and results.

    Left in place, the checkpoints would be resumed by the next `latest` instead of the continued run, and would
    block its saves; the export would pass for the continued run's until that run writes its own (never, if it is
    stopped first). They go to `output_dir/superseded_checkpoints/<time>/`. The logs stay: the continued run drops
    their records past `step` (`easytrain.reporting`).
    """
    if not resumes_own_checkpoints(output_dir, (root, step)):
        return []
    return set_aside(output_dir, [s for s in step_dirs(root) if s > step], f"resuming step {step} of {root}",
                     outputs=FINAL_OUTPUTS, held=held)


def set_aside(output_dir: Path, steps: list[int], why: str, outputs: tuple[str, ...] = (),
              held: HeldRun | None = None) -> list[Path]:
    """Move these step directories of `output_dir/checkpoints`, and those of `outputs` (names in `output_dir`)
    present, to a new `superseded_checkpoints/<time>/`; nothing moves without a step to set aside. `held` records
    the moves, for a claim to undo them (`claim_output_dir`)."""
    if not steps:
        return []
    held = held if held is not None else HeldRun(output_dir)
    root = output_dir / CHECKPOINTS_DIRNAME
    complete = set(finalized_steps(root))
    destination = held.new_directory(output_dir / SUPERSEDED_DIRNAME / time.strftime("%Y%m%d-%H%M%S"))
    moved = [held.move(root / str(s), destination / str(s)) for s in steps]
    if incomplete := [s for s in steps if s not in complete]:
        logger.warning("%s holds incomplete checkpoint(s) at step(s) %s (not resumable: an item is missing)",
                       root, incomplete)
    logger.warning("%s: moved the checkpoint directories %s of %s to %s", why, steps, root, destination)
    if present := [name for name in outputs if run_dir.present(output_dir / name)]:
        moved += [held.move(output_dir / name, destination / name) for name in present]
        logger.warning("%s: moved %s of %s (the end of the lineage set aside, not of the continued run) to %s",
                       why, ", ".join(present), output_dir, destination)
    return moved
