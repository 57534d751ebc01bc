"""`easytrain train ...` (and `python -m easytrain train ...`).

`--task` picks a registered trainer or any `package.module:Class` implementing `TrainerProtocol`.
"""

from __future__ import annotations

import importlib
import json
import logging
import sys
from pathlib import Path
from typing import Callable, Sequence

import jax

from easytrain.arguments import TrainingArguments
from easytrain.config_io import build_parser, parse_arguments
from easytrain.errors import ArgumentError, EasytrainError
from easytrain.protocol import TrainerProtocol, check_implements

TrainerFactory = Callable[[TrainingArguments], TrainerProtocol]
TASKS: dict[str, str] = {"lm": "easytrain.trainers.base:BaseTrainer"}
USAGE = "usage: easytrain train [--config FILE] [--FIELD VALUE ...]   (easytrain train --help lists every field)"


def register_task(name: str, target: str) -> None:
    """Make `--task name` build `target` ('package.module:Class')."""
    TASKS[name] = target


def resolve_trainer(task: str) -> TrainerFactory:
    target = TASKS.get(task, task)
    if ":" not in target:
        raise ArgumentError("task", f"unknown task {task!r}; use one of {sorted(TASKS)} or 'package.module:Class'.")
    module_name, _, attribute = target.partition(":")
    try:
        return getattr(importlib.import_module(module_name), attribute)
    except (ImportError, AttributeError) as error:
        raise ArgumentError("task", f"cannot import {target!r} ({error}); check the module path and class name.")


def run(arguments: TrainingArguments) -> dict[str, float]:
    """Build the trainer, train, evaluate and export: the whole job the CLI runs.

    Every process returns the summary; only process 0 writes `results.json`, like every other file.
    """
    trainer = resolve_trainer(arguments.task)(arguments)
    check_implements(trainer)  # not isinstance: on Python 3.11 that evaluates properties, i.e. builds the run
    train_logs = dict(trainer.train())
    eval_logs = dict(trainer.evaluate())
    summary = {**{f"train_{k}": v for k, v in train_logs.items()}, **eval_logs}
    if jax.process_index() == 0:
        Path(arguments.output_dir).mkdir(parents=True, exist_ok=True)
        (Path(arguments.output_dir) / "results.json").write_text(json.dumps(summary, indent=2))
    return summary


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


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command != "train":
        print(f"easytrain: unknown command {command!r}\n{USAGE}", file=sys.stderr)
        return 2
    if "-h" in rest or "--help" in rest:
        build_parser().print_help()
        return 0
    _show_progress_messages()
    try:
        summary = run(parse_arguments(rest))
    except EasytrainError as error:
        print(f"easytrain: error: {error}", file=sys.stderr)
        return 2
    print(json.dumps(summary))
    return 0
