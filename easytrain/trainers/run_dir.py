"""The output directory of a run: checked before any compute, and again when `train()` takes it (another run may
have trained there since the trainer was built: `claim`), never clobbered by accident."""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import functools
import logging
import os
import shutil
import uuid
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

from easytrain.arguments import TrainingArguments
from easytrain.best_metric_direction import direction_inferred
from easytrain.checkpoint import CHECKPOINTS_DIRNAME, CheckpointNotFoundError, finalized_steps, resolve_checkpoint
from easytrain.checkpoint_dirs import asks_latest
from easytrain.config_io import ARGUMENTS_FILE
from easytrain.errors import OutputDirError
from easytrain.jobs import JOB_FILENAME
from easytrain.linked_logs import WrittenLog, take_back
from easytrain.reporting import LOG_NAMES, holds_records, parse_report_to
from easytrain.sinks import MLFLOW_STATE_FILENAME, WANDB_STATE_FILENAME
from easytrain.trainers import argument_agreement, shared_output_dir
from easytrain.trainers.restore_checks import check_run_info_readable
from easytrain.trainers.shared_output_dir import Gather
from easytrain.trainers.start_agreement import agreed

#: What the end of a run writes (the export, the command's results): the state of the lineage that reached it. A
#: claim moves both aside with the lineage (`claim.set_aside_newer_checkpoints`), whoever wrote results.json.
FINAL_OUTPUTS = ("final_model", "results.json")
#: What a run leaves in its output_dir that a later fresh run would overwrite or mix with its own.
PREVIOUS_RUN_OUTPUTS = (*FINAL_OUTPUTS, "metrics.jsonl", "metrics.csv", "tensorboard")
#: What `overwrite_output_dir` removes: the previous run, so nothing of it is mistaken for the new one's.
RUN_ARTIFACTS = (CHECKPOINTS_DIRNAME, *PREVIOUS_RUN_OUTPUTS, JOB_FILENAME)
SUPERSEDED_DIRNAME = "superseded_checkpoints"
#: Where a claim keeps what it removes until the new run's first step is done (`held_run`).
REPLACED_DIRNAME = "replaced_run"
#: Where the claim moves an older run's files: a dangling link there is refused before the claim (`check_links`).
HELD_DIRNAMES = (SUPERSEDED_DIRNAME, REPLACED_DIRNAME)
#: The logs a run stopped before its first checkpoint leaves: a rerun that starts it over replaces them.
STARTED_RUN_LOGS = tuple(LOG_NAMES.values())  # metrics.jsonl, metrics.csv, tensorboard

logger = logging.getLogger("easytrain")

#: What the command running the trainer writes in output_dir besides the trainer's own outputs (`easytrain train`:
#: results.json): `run_outputs` while it runs (`command_outputs`). A Python-API run writes no results.json.
_COMMAND_OUTPUTS: contextvars.ContextVar[tuple[str, ...]] = contextvars.ContextVar("command_outputs", default=())


@contextlib.contextmanager
def command_outputs(names: Sequence[str]) -> Iterator[None]:
    """While the command that builds and trains a run writes `names` in its output_dir itself: a dangling link there is
    refused with the run's own (`check_links`), before training, not by the command's write once it is done."""
    token = _COMMAND_OUTPUTS.set(tuple(names))
    try:
        yield
    finally:
        _COMMAND_OUTPUTS.reset(token)


def check_writable(directory: Path) -> None:
    """Create `directory` and write a file in it, or refuse naming the problem (a file in its place)."""
    if file := next((p for p in (directory, *directory.parents) if p.exists() and not p.is_dir()), None):
        raise OutputDirError(f"output_dir: {str(file)!r} is a file, not a directory; choose another --output_dir "
                             "(a directory, or a path that does not exist yet), or move the file away.")
    try:
        directory.mkdir(parents=True, exist_ok=True)
        probe = directory / f".write-probe-{uuid.uuid4().hex}"
        probe.write_text("")
        probe.unlink()
    except OSError as error:
        raise OutputDirError(f"output_dir: cannot write to {str(directory)!r} ({error.strerror}); "
                             "choose a writable --output_dir.") from error


def resumes_own_checkpoints(output_dir: Path, resume: tuple[Path, int] | None) -> bool:
    """Whether the resumed checkpoint is one of `output_dir/checkpoints` (the run continues its own lineage)."""
    return resume is not None and resume[0].resolve() == (Path(output_dir) / CHECKPOINTS_DIRNAME).resolve()


def rerun_arguments(args: TrainingArguments, task: str | None = None) -> TrainingArguments:
    """The arguments `arguments.json` records, so that `--config arguments.json` reruns the job where it stands:
    from its newest checkpoint (`resume_from_checkpoint='latest'`, not an old step it was once resumed from, whose
    newer checkpoints a rerun would set aside) and never removing it (`overwrite_output_dir=False`). The values
    given stay in every checkpoint's run_info. A `greater_is_better` inferred from the metric's name is inferred
    again in the copy (given as the resolved value, it would count as given and be saved so). The launch fields
    (`LAUNCH_FIELDS`) are left unset: they are process 0's, and a rerun on one process would wait forever as the
    coordinator of the old job, two hosts given them would both claim process 0. `task`, where given, replaces the
    argument's (the task of the trainer that ran: `run_record.recorded_task`)."""
    direction = None if direction_inferred(args) else args.greater_is_better
    return dataclasses.replace(args, resume_from_checkpoint="latest", overwrite_output_dir=False,
                               greater_is_better=direction, task=task or args.task, **dict.fromkeys(LAUNCH_FIELDS))


#: How one launch joins its processes (`jax.distributed`), given per host: not saved for a rerun.
LAUNCH_FIELDS = ("coordinator_address", "num_processes", "process_id")


def restarts_unsaved_run(args: TrainingArguments) -> bool:
    """`latest` in an output_dir whose run stopped before its first complete checkpoint (it wrote its
    arguments.json, none yet): nothing to resume, so the run starts over there. Without an arguments.json,
    `latest` still fails (a mistyped output_dir is not a new run)."""
    return _asks_latest_of_started_run(args) and not finalized_steps(Path(args.output_dir) / CHECKPOINTS_DIRNAME)


def _asks_latest_of_started_run(args: TrainingArguments) -> bool:
    """`latest` in an output_dir a run has started in (its arguments.json): `restarts_unsaved_run` without its
    listing of the checkpoints."""
    return asks_latest(args.resume_from_checkpoint) and (Path(args.output_dir) / ARGUMENTS_FILE).is_file()


def check_output_dir(args: TrainingArguments, *, is_main_process: bool = True, gather: Gather | None = None,
                     check_start: StartCheck | None = None, read_inputs: Callable[[], None] | None = None,
                     check_settings: Callable[[], None] | None = None,
                     task_arguments: Sequence[Any] = ()) -> tuple[Path, int] | None:
    """Validate `output_dir` and `resume_from_checkpoint`; return the checkpoint to resume, if any.

    Only checks: nothing is moved or removed here (`claim_output_dir` does that once the run has passed
    every other check). A directory holding another run's checkpoints, exported model or logs is refused
    unless the run resumes its own checkpoints or `overwrite_output_dir` is set; so is one resumed from a
    checkpoint outside it (another run's, or one set aside), whose saves would mix with that run's. `latest` over
    a run stopped before its first checkpoint starts it over (`restarts_unsaved_run`); a resumed checkpoint whose
    run_info cannot be read is refused before any data or weights are read (`check_run_info_readable`).

    Several processes (`gather`: by default `multihost_utils.process_allgather`) decide alike (`agreed`: any may
    refuse, even where only process 0 writes here), given the same arguments (`args`, `task_arguments`: compared in
    the first gather, `argument_agreement.telling_differences`) and, where they checkpoint or resume, one shared
    output_dir (`shared_output_dir`): else the run would hang at its first save. Two gathers where output_dir is
    shared, one elsewhere (more where they look again, or where their arguments differ). The decision runs, in a
    single process's order too: `read_inputs` (the files the arguments name, read once however often the processes
    look), `check_start` given the checkpoint to resume (before `check_writable` creates output_dir), then, once,
    `check_settings` (what the arguments alone refuse: the trainer's mesh, compiler options, cache directory). A
    start refused on any process leaves no directory that process 0 made for it.
    """
    if gather is None and _process_count() > 1:
        from jax.experimental import multihost_utils

        gather = multihost_utils.process_allgather
    inputs = functools.cache(read_inputs or (lambda: None))  # once: a read that failed stops every process
    settings = functools.cache(check_settings or (lambda: None))

    def decide() -> tuple[Path, int] | None:
        inputs()
        resume = _checked_resume(args, is_main_process, check_start)
        settings()
        return resume

    agree = functools.partial(agreed, decide)
    if gather is not None:
        gather = argument_agreement.telling_differences(gather, args, task_arguments)
        if shared_output_dir.needs_check(args):  # it removes what process 0 made for a start refused
            return shared_output_dir.check_processes_share(Path(args.output_dir), gather,
                                                           is_main_process=is_main_process, then=agree)
    created = shared_output_dir.missing_directories(Path(args.output_dir)) if is_main_process else []
    try:
        return agree(gather)
    except BaseException:
        shared_output_dir.remove_empty(created)  # check_writable's, where a process refused
        raise


#: A check of the start `check_output_dir` decided, given the checkpoint to resume (None: a fresh start).
StartCheck = Callable[[tuple[Path, int] | None], None]


def _checked_resume(args: TrainingArguments, is_main_process: bool,
                    check_start: StartCheck | None = None) -> tuple[Path, int] | None:
    resume = _checked_directory(args, is_main_process, check_start)
    check_run_info_readable(resume)
    return resume


def _checked_directory(args: TrainingArguments, is_main_process: bool,
                       check_start: StartCheck | None = None) -> tuple[Path, int] | None:
    """`check_output_dir` on this process's view of the directory alone (no collective). `check_start` runs once
    the resume is known, before `check_writable` creates output_dir: a start it refuses leaves nothing behind."""
    output_dir = Path(args.output_dir)
    try:  # one listing of the checkpoints: `latest` finds none only where the run stopped before its first save
        resume, restart = resolve_checkpoint(output_dir, args.resume_from_checkpoint), False
    except CheckpointNotFoundError:
        if not _asks_latest_of_started_run(args):
            raise
        resume, restart = None, True  # `restarts_unsaved_run`
    if check_start is not None:
        check_start(resume)
    own = resumes_own_checkpoints(output_dir, resume)
    moved = RUN_ARTIFACTS if args.overwrite_output_dir and not own else ()  # moved away as links: not checked
    held = tuple(name for name in HELD_DIRNAMES if (output_dir / name).is_symlink())  # listed only where one is
    # replaced_run/ takes what a claim holds: an older run's files (its arguments.json alone, where nothing else of
    # it is there) wherever the run does not continue its own checkpoints; superseded_checkpoints/ what it sets aside
    held = held if held and (args.overwrite_output_dir or restart or not own or _sets_aside(output_dir, resume)) else ()
    check_links(output_dir, (*run_outputs(args), *held), skip=(*moved, *(STARTED_RUN_LOGS if restart else ())),
                movable=() if own else RUN_ARTIFACTS)
    if is_main_process:
        check_writable(output_dir)
    if own or args.overwrite_output_dir:
        return resume
    existing = finalized_steps(output_dir / CHECKPOINTS_DIRNAME)
    if existing and resume is not None:
        source = resume[0] / str(resume[1])
        raise OutputDirError(
            f"output_dir: {str(output_dir)!r} already holds a run with checkpoints at steps {existing}, and "
            f"resume_from_checkpoint {str(source)!r} lies outside {str(output_dir / CHECKPOINTS_DIRNAME)!r}: the "
            "resumed run's checkpoints would collide or mix with those. Resume into another (empty) --output_dir, "
            "pass --resume_from_checkpoint latest to continue that run instead, or pass --overwrite_output_dir to "
            f"move its checkpoints to {SUPERSEDED_DIRNAME}/ (and remove its logs and export) and continue the "
            "resumed checkpoint here.")
    if existing:
        raise OutputDirError(
            f"output_dir: {str(output_dir)!r} already holds a run with checkpoints at steps {existing}. "
            "Pass --resume_from_checkpoint latest to continue it, --overwrite_output_dir to start over "
            "(removes those checkpoints), or choose another --output_dir.")
    if found := [name for name in PREVIOUS_RUN_OUTPUTS if (output_dir / name).exists()
                 and not (name in STARTED_RUN_LOGS and (restart or not holds_records(output_dir / name)))]:
        resuming = "" if resume is None else " of its own"
        raise OutputDirError(
            f"output_dir: {str(output_dir)!r} holds another run's {', '.join(found)} (and no checkpoint{resuming} to "
            f"resume).{_start_over_hint(output_dir, found, resume)} Pass --overwrite_output_dir to start over "
            "(removes them), or choose another --output_dir.")
    return resume


def _start_over_hint(output_dir: Path, found: Sequence[str], resume: tuple[Path, int] | None) -> str:
    """Where a run started in `output_dir` (its arguments.json) left only logs (killed before its first step, say),
    for a fresh run (not one resuming a checkpoint from outside): `latest` starts that run over, keeping the links
    among them (`claim.start_over`)."""
    if resume is not None or not (output_dir / ARGUMENTS_FILE).is_file() \
            or any(name not in STARTED_RUN_LOGS for name in found):
        return ""
    return (" A run started there and stopped before its first checkpoint: pass --resume_from_checkpoint latest to "
            "start that run over (its logs emptied, a log linked to another disk kept linked).")


def present(path: Path) -> bool:
    """Whether `path` is there: a file, a directory, or a link, even one whose target is gone."""
    return path.exists() or path.is_symlink()


def run_outputs(args: TrainingArguments) -> tuple[str, ...]:
    """The names in output_dir this run writes through: its checkpoints, records and arguments always, the export
    where `save_pretrained_at_end`, each log and tracker folder or record where `report_to` names its sink,
    tensorboard/ where it writes a trace (`profile_steps`: `profiling.trace_dir`), and what the command running it
    writes (`command_outputs`: results.json under `easytrain train`). What a trainer alone writes there (SFT's
    sft_data_stats.json, DPO's reference_logps/) its own `check_inputs` checks, and the command checks results.json
    for a trainer not built on BaseTrainer (`cli.run`)."""
    sinks = {*parse_report_to(args.report_to), *(("tensorboard",) if args.profile_steps else ())}
    by_sink = {**{sink: (name,) for sink, name in LOG_NAMES.items()},
               "wandb": ("wandb", WANDB_STATE_FILENAME), "mlflow": (MLFLOW_STATE_FILENAME,)}
    return (CHECKPOINTS_DIRNAME, JOB_FILENAME, ARGUMENTS_FILE, *_COMMAND_OUTPUTS.get(),
            *(("final_model",) if args.save_pretrained_at_end else ()),
            *(name for sink, names in by_sink.items() if sink in sinks for name in names))


def _sets_aside(output_dir: Path, resume: tuple[Path, int] | None) -> bool:
    """Whether a resume of the run's own checkpoints moves newer step directories aside (`claim.set_aside`)."""
    return resumes_own_checkpoints(output_dir, resume) and any(
        step > resume[1] for step in step_dirs(output_dir / CHECKPOINTS_DIRNAME))


def step_dirs(root: Path) -> list[int]:
    """Every `<step>` directory under `root`, complete or not (a damaged copy would still block that step's save), or
    link to one, even dangling (it would block the save too): what a claim sets aside (`claim.set_aside`)."""
    if not root.is_dir():
        return []
    return sorted(int(d.name) for d in root.iterdir() if d.name.isdigit() and (d.is_dir() or d.is_symlink()))


def check_links(output_dir: Path, outputs: Sequence[str], skip: Sequence[str] = (),
                movable: Sequence[str] = RUN_ARTIFACTS) -> None:
    """Refuse a link whose target is gone where the run writes (`outputs`, `run_outputs`: its checkpoints/ on a scratch
    disk not mounted; where the claim moves the older run's files, `HELD_DIRNAMES`): the run would fail at its first
    write into it, after its set-up. A link the run does not write through (a `tensorboard` one with no TensorBoard
    sink) is left alone. `skip`: what the claim removes anyway. `movable`: what `overwrite_output_dir` would move away
    (nothing for a resume of the run's own checkpoints, which keeps its outputs in place), offered as a way out only
    where every such link is one of those."""
    names = [name for name in outputs if name not in skip]
    if dangling := {name: os.readlink(output_dir / name) for name in names
                    if (output_dir / name).is_symlink() and not (output_dir / name).exists()}:
        overwrite = ", or pass --overwrite_output_dir (moves the link away with the older run)" \
            if all(name in movable for name in dangling) else ""
        raise OutputDirError(
            f"output_dir: in {str(output_dir)!r}, {', '.join(f'{k} links to {v!r}' for k, v in dangling.items())}, "
            "which does not exist (a disk not mounted?). Make the target available or remove the link (the run then "
            f"writes into output_dir itself){overwrite}.")


def remove(target: Path) -> None:
    """Delete a file or a directory tree, if it is there. A link (to a directory on another disk, say, or dangling)
    is removed itself, never what it points to."""
    if target.is_dir() and not target.is_symlink():
        shutil.rmtree(target)
    elif present(target):
        target.unlink()


def remove_unstarted_logs(output_dir: Path, is_main_process: bool,
                          written: Mapping[str, WrittenLog] | None = None) -> None:
    """A fresh run stopped or failed before its first step (a signal or an error while it compiled) leaves the logs it
    opened, with no step in them: removed (process 0), so that the same command line starts it again
    (`check_output_dir` would take them for another run's). They are this run's: a fresh run starts only where there
    are none, or removes them. `job.json` keeps how it ended. A link there (a log kept on another disk, admitted only
    empty: `reporting.holds_records`) stays as the run found it, and of what it leads to only what the run wrote
    goes (`written`, its sinks' `Reporter.written_logs`: `linked_logs.take_back`), never what another wrote there
    meanwhile or a file the link was pointed at since. A dangling link is not the run's (`check_links` refused those
    it writes through): it stays."""
    if is_main_process:
        for name in STARTED_RUN_LOGS:
            if not (output_dir / name).is_symlink():
                remove(output_dir / name)
            elif written and name in written:
                take_back(written[name])


def _process_count() -> int:
    import jax

    return jax.process_count()
