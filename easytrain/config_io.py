"""Read `TrainingArguments` from the command line, YAML or JSON files, and write them back.

Precedence: dataclass defaults < `--config FILE` < command-line flags.
"""

from __future__ import annotations

import argparse
import difflib
import json
import os
from pathlib import Path
from typing import Any, Sequence

import yaml
from transformers import HfArgumentParser

from easytrain.arguments import TrainingArguments, check_known_fields, field_names
from easytrain.errors import ArgumentError

ARGUMENTS_FILE = "arguments.json"


def load_config_file(path: str | os.PathLike) -> dict[str, Any]:
    """Read a YAML (.yaml/.yml) or JSON (.json) file of argument values."""
    path = Path(path)
    if not path.is_file():
        raise ArgumentError("config", f"file {str(path)!r} does not exist; pass an existing .yaml or .json file.")
    text = path.read_text()
    if path.suffix in (".yaml", ".yml"):
        values = yaml.safe_load(text) or {}
    elif path.suffix == ".json":
        values = json.loads(text)
    else:
        raise ArgumentError("config", f"unsupported file type {path.suffix!r}; use .yaml, .yml or .json.")
    if not isinstance(values, dict):
        raise ArgumentError("config", f"{str(path)!r} must hold a mapping of argument names to values.")
    check_known_fields(values, source=str(path))
    return values


def build_parser() -> HfArgumentParser:
    parser = HfArgumentParser(TrainingArguments, allow_abbrev=False, prog="easytrain train",
                              description="Train a model with easytrain. Every flag has a default; "
                                          "with none, a tiny model learns arithmetic on embedded data.")
    parser.add_argument("--config", default=None,
                        help="YAML or JSON file of arguments; command-line flags override its values.")
    return parser


def parse_arguments(argv: Sequence[str] | None = None) -> TrainingArguments:
    """Parse `[--config FILE] [--field value ...]` into validated `TrainingArguments`."""
    argv = list(argv) if argv is not None else []
    pre = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    pre.add_argument("--config", default=None)
    known, _ = pre.parse_known_args(argv)
    parser = build_parser()
    if known.config:
        parser.set_defaults(**load_config_file(known.config))
    outputs = parser.parse_args_into_dataclasses(args=argv, return_remaining_strings=True)
    arguments, remaining = outputs[0], outputs[-1]
    if remaining:
        raise _unknown_flag_error(remaining)
    return arguments


def _unknown_flag_error(remaining: list[str]) -> ArgumentError:
    flag = next((r for r in remaining if r.startswith("-")), remaining[0])
    name = flag.lstrip("-").split("=")[0].replace("-", "_")
    close = difflib.get_close_matches(name, field_names(), n=1)
    hint = f"Did you mean --{close[0]}?" if close else "Run `easytrain train --help` for the list."
    return ArgumentError(name, f"unknown command-line argument {flag!r}. {hint}")


def save_arguments(arguments: TrainingArguments, directory: str | os.PathLike) -> Path:
    """Write `arguments.json` atomically, so a crash never leaves half a file."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / ARGUMENTS_FILE
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(arguments.to_json())
    os.replace(tmp, path)
    return path


def load_arguments(path: str | os.PathLike) -> TrainingArguments:
    """Read arguments written by `save_arguments` (a file or the directory holding it)."""
    path = Path(path)
    if path.is_dir():
        path = path / ARGUMENTS_FILE
    return TrainingArguments.from_dict(json.loads(path.read_text()))


def to_yaml(arguments: TrainingArguments) -> str:
    return yaml.safe_dump(arguments.to_dict(), sort_keys=False)
