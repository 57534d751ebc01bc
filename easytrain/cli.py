"""`easytrain train|tasks|plot ...` (and `python -m easytrain ...`).

`--task` picks a registered task (see `easytrain.tasks.registry`: decorators, lazy 'module:Class'
strings, the `easytrain.tasks` entry-point group) or any `package.module:Class` implementing
`TrainerProtocol`. A task's own argument dataclasses are parsed next to `TrainingArguments`.

Exit status: 0 done (completed, or stopped by the stop file or a callback), 1 failed once training had started
(job.json `failed`), 2 refused before it (arguments, data, model, output directory, checkpoint to resume, another
run still training in output_dir: fix the command and rerun), 75 stopped by SIGTERM or SIGINT with nothing lost:
after a checkpoint, before the first step, or after the last one before `results.json`
(`easytrain.trainers.preemption`; the command catches them from its start until `results.json` is written:
`easytrain.stop_signals`).
"""

from __future__ import annotations

import importlib.metadata
import json
import logging
import platform
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax

from easytrain import stop_signals
from easytrain.arguments import TrainingArguments
from easytrain.config_io import CLI_PROG, build_parser, parse_task_arguments, peek_task
from easytrain.errors import EasytrainError
from easytrain.jobs import JOB_FILENAME, Job
from easytrain.protocol import TrainerProtocol, check_implements
from easytrain.sinks import strict_json, write_json_atomically
from easytrain.tasks.registry import Task, available_tasks, register_task, resolve_task

__all__ = ["FAILED_EXIT_CODE", "REFUSED_EXIT_CODE", "command_job", "main", "register_task", "resolve_task",
           "resolve_trainer", "run"]

TrainerFactory = Callable[..., TrainerProtocol]
USAGE = """usage: easytrain train [--task NAME] [--config FILE] [--FIELD VALUE ...]   train (--help lists every field)
       easytrain tasks                                                      list the tasks --task accepts
       easytrain plot RUN_DIR [RUN_DIR ...] [--out DIR]                     PNG figures of runs' metrics.jsonl
       easytrain --version                                                  versions of easytrain and its stack"""
#: The libraries whose versions decide a run's numbers, reported by `easytrain --version` (for bug reports).
STACK = ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "grain", "transformers", "datasets", "tokenizers")
FAILED_EXIT_CODE = 1  # training started, then failed: job.json says why
RESULTS_FILENAME = "results.json"  # the command's, not the trainer's: `run_dir.command_outputs`
REFUSED_EXIT_CODE = 2  # refused before training (or a bad command line): nothing was trained


def resolve_trainer(task: str) -> TrainerFactory:
    """The factory `--task task` builds: `factory(training_arguments, *task_arguments)`."""
    return resolve_task(task).target


def command_job(arguments: TrainingArguments) -> Job:
    """The job `easytrain train` runs in, not entered yet. No sinks of its own: the trainer's are the run's, and
    `log_metric` reaches them while it trains."""
    return Job(arguments.output_dir, progress_start=arguments.progress_start, progress_end=arguments.progress_end,
               stop_file=arguments.stop_file or None, report_to=["none"])


def run(arguments: TrainingArguments, task_arguments: Sequence[Any] | None = None,
        job: Job | None = None) -> dict[str, float]:
    """Build the trainer, train, evaluate and export: the whole job the CLI runs.

    `task_arguments` are the instances of the task's argument dataclasses (their defaults when None).
    Every process returns the summary; only process 0 writes `results.json`, like every other file (NaN and
    infinities as the strings "nan", "inf", "-inf", as in job.json). The whole job, from data loading to
    `results.json`, is reported in `output_dir/job.json` (`job`, default `command_job(arguments)`: queued while
    the data and model are prepared; a failure anywhere is recorded there). A SIGTERM or SIGINT before the first
    step (single-process runs) stops the job with status 75 and `stopped`: caught from here (from the command's
    start) until the final evaluation has ended; one after the last step (the final export, the evaluation) stops it
    with 75 too, before `results.json`; its message names the rerun that evaluates and writes it
    (`StoppedAfterTraining`). A start while
    another process trains in `output_dir` is refused before `job.json` is written (`run_lock.refuse_if_held`).
    """
    from easytrain.trainers import BaseTrainer, run_lock  # imported here: `easytrain tasks` and `plot` need neither
    from easytrain.trainers.preemption import final_step, joins_other_processes, stopping_after_training
    from easytrain.trainers.run_dir import check_links, command_outputs

    if joins_other_processes(arguments):  # JAX's preemption service takes SIGTERM
        stop_signals.release(redeliver=True)
    else:
        stop_signals.catch()
    try:
        with command_outputs((RESULTS_FILENAME,)):  # a dangling link there: refused at the trainer's check
            run_lock.refuse_if_held(arguments.output_dir)  # a second start of a live run: before any read or write
            trainer = resolve_task(arguments.task).build(arguments, task_arguments)
            check_implements(trainer)  # not isinstance: on Python 3.11 that evaluates properties, i.e. builds the run
            if not isinstance(trainer, BaseTrainer):  # its train() does not look at the flag: signals act as before
                stop_signals.release(redeliver=True)
                check_links(Path(arguments.output_dir), (RESULTS_FILENAME,), movable=())  # it has no check of its own
            with job or command_job(arguments):  # entered after the trainer: output_dir checked
                train_logs = dict(trainer.train())
                with stopping_after_training(final_step(trainer), arguments):  # a stop after the last step: exit 75
                    eval_logs = dict(trainer.evaluate())
                summary = {**{f"train_{k}": v for k, v in train_logs.items()}, **eval_logs}
                with stop_signals.while_acting("writing results.json, then ending as completed"):
                    _write_results(arguments.output_dir, summary)
    finally:
        stop_signals.release()  # the command's catch ends once results.json is written (or the run failed)
    return summary


def _write_results(output_dir: str, summary: dict[str, float]) -> None:
    """`results.json`, on process 0: whole or not at all (a kill mid-write), through a link (to another disk)."""
    if jax.process_index() == 0:
        Path(output_dir).mkdir(parents=True, exist_ok=True)
        write_json_atomically(Path(output_dir) / RESULTS_FILENAME, summary)


def _show_progress_messages() -> None:
    """INFO lines of the `easytrain` logger on stderr (resumed from, compiled, saved), whatever else
    (absl, jax) configured the root logger first."""
    logger = logging.getLogger("easytrain")
    if not logger.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        logger.propagate = False


def _train(argv: list[str]) -> int:
    task = resolve_task(peek_task(argv))
    if "-h" in argv or "--help" in argv:
        parser = build_parser(task.arguments, task.name, CLI_PROG)
        if task.description:
            parser.description = f"{parser.description}\n\nTask {task.name!r}: {task.description}"
        parser.print_help()
        return 0
    _show_progress_messages()
    arguments, task_arguments = parse_task_arguments(argv, task.arguments, task.name, CLI_PROG)
    job = command_job(arguments)
    started = time.monotonic()
    try:
        summary = run(arguments, task_arguments, job)
    except EasytrainError as error:
        if not job.started:
            raise  # refused before training: `main` exits with REFUSED_EXIT_CODE
        print(f"easytrain: error: {error}", file=sys.stderr)
        return FAILED_EXIT_CODE
    except OSError as error:  # job.json could not record a failure (a full disk): the failure is the news
        if not job.started or not isinstance(failure := error.__context__, EasytrainError):
            raise
        print(f"easytrain: error: {failure} ({JOB_FILENAME} could not record this failure: {error})", file=sys.stderr)
        return FAILED_EXIT_CODE
    if jax.process_index() == 0:
        print(done_message(arguments, summary, time.monotonic() - started), file=sys.stderr)
    print(json.dumps(strict_json(summary), allow_nan=False))  # the last line of stdout, which scripts parse
    return 0


def done_message(arguments: TrainingArguments, summary: dict[str, float], seconds: float) -> str:
    """What a person reads at the end of a run (stderr): how long it took, the final eval metrics to 4 significant
    digits, and where `results.json` and the exported model are. The JSON line on stdout keeps full precision."""
    metrics = ", ".join(f"{name} {value:.4g}" for name, value in summary.items()
                        if name.startswith("eval_") and isinstance(value, (int, float)))
    output_dir = Path(arguments.output_dir)
    lines = [f"easytrain: done in {_duration(seconds)}{': ' + metrics if metrics else ''}",
             f"  results: {output_dir / 'results.json'}"]
    if arguments.save_pretrained_at_end and (output_dir / "final_model").is_dir():
        lines.append(f"  model: {output_dir / 'final_model'}")
    return "\n".join(lines)


def _duration(seconds: float) -> str:
    """`42.5 s`, `3 min 7 s`, `2 h 5 min`."""
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, rest = divmod(round(seconds), 60)
    return f"{minutes} min {rest} s" if minutes < 60 else f"{minutes // 60} h {minutes % 60} min"


def versions() -> str:
    """`easytrain X (jax Y, ...; Python Z)` from the installed distributions' metadata: nothing is imported."""
    def version(name: str) -> str:
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            return "not installed"

    stack = ", ".join(f"{name} {version(name)}" for name in STACK)
    return f"easytrain {version('easytrain')} ({stack}; Python {platform.python_version()})"


def format_tasks(tasks: Sequence[Task]) -> str:
    """One line per task: name, description, where it comes from."""
    width = max((len(task.name) for task in tasks), default=4)
    lines = [f"  {task.name:<{width}}  {task.description or '(no description)'}  [{task.origin}]" for task in tasks]
    return "\n".join(["Tasks for `easytrain train --task NAME` (`--task NAME --help` shows a task's flags):",
                      *lines, "Or `--task package.module:Class` for any class implementing easytrain.TrainerProtocol."])


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command == "--version":
        print(versions())
        return 0
    try:
        if command == "train":
            return _train(rest)
        if command == "tasks":
            if rest:
                print("usage: easytrain tasks   (lists every task; it takes no arguments)")
                return 0 if rest[0] in ("-h", "--help") else 2
            print(format_tasks(available_tasks()))
            return 0
        if command == "plot":
            from easytrain.plots import main as plot_main

            return plot_main(rest)
    except EasytrainError as error:
        print(f"easytrain: error: {error}", file=sys.stderr)
        return REFUSED_EXIT_CODE
    print(f"easytrain: unknown command {command!r}\n{USAGE}", file=sys.stderr)
    return REFUSED_EXIT_CODE
