"""Read `TrainingArguments` (and a task's own argument dataclasses) from the command line, YAML or
JSON files, and write them back.

Precedence: dataclass defaults < `--config FILE` < command-line flags. One `HfArgumentParser` parses
`TrainingArguments` and the task's dataclasses together, so a config file may hold both.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import sys
from collections.abc import Sequence
from pathlib import Path
import typing
from typing import Any, Callable, get_type_hints

import yaml
from transformers import HfArgumentParser

from easytrain.argument_checks import check_file_strings, check_file_values, check_given_values
from easytrain.argument_values import transformers_value_hint
from easytrain.arguments import TrainingArguments, field_names
from easytrain.best_metric_direction import saved_values
from easytrain.errors import ArgumentError
from easytrain.sinks import replace_through_link
from easytrain.suggestions import as_flags, as_keys, unknown_name_hint
from easytrain.tasks.registry import check_argument_dataclasses, tasks_declaring

ARGUMENTS_FILE = "arguments.json"
_DEFAULT_TASK = TrainingArguments.__dataclass_fields__["task"].default


def load_config_file(path: str | os.PathLike, task_arguments: Sequence[type] = (),
                     task: str | None = None, prog: str | None = None) -> dict[str, Any]:
    """Read a YAML (.yaml/.yml) or JSON (.json) file of argument values (TrainingArguments' and those of `task`,
    whose argument dataclasses are `task_arguments`); a key of another task is refused with the fix of `prog`'s
    parse (`CLI_PROG`: the command's `--task`; else a script's: `parse_task_arguments`)."""
    path = Path(path)
    if not path.is_file():
        raise ArgumentError("config", f"file {str(path)!r} does not exist; pass an existing .yaml or .json file.")
    if path.suffix not in (".yaml", ".yml", ".json"):
        raise ArgumentError("config", f"unsupported file type {path.suffix!r}; use .yaml, .yml or .json.")
    values = _parse(path)
    if not isinstance(values, dict):
        raise ArgumentError("config", f"{str(path)!r} must hold a mapping of argument names to values.")
    known = _known_fields(task_arguments)
    for key in values:
        if key not in known:
            raise _unknown_key_error(str(key), values[key], path, known, _Parse(task, task_arguments, prog))
    check_file_strings(values, (TrainingArguments,), source=str(path))
    return check_file_values(values, task_arguments, source=str(path))


class _GroupedParser(HfArgumentParser):
    """`HfArgumentParser` with one help group per dataclass, so `--help` shows which flags a task adds."""

    def __init__(self, dataclass_types: Sequence[type], titles: dict[type, str], **kwargs: Any):
        self._titles = titles
        super().__init__(dataclass_types, **kwargs)

    def error(self, message: str) -> typing.NoReturn:
        """argparse's refusal of a value (a choice, a number), followed by the easytrain setting for what
        transformers' Trainer means by it (`--optimizer adamw_torch`, `--warmup_steps 0.1`)."""
        refused = re.search(r"^argument --(\w+)\S*: invalid (?:choice|\w+ value): '([^']*)'", message)
        super().error(message + (transformers_value_hint(*refused.groups()) if refused else ""))

    def _add_dataclass_arguments(self, dtype: type) -> None:
        doc = (dtype.__doc__ or "").strip()
        description = doc.splitlines()[0] if doc and not doc.startswith(f"{dtype.__name__}(") else None
        group = self.add_argument_group(self._titles.get(dtype, dtype.__name__), description)
        try:
            hints = get_type_hints(dtype)
        except NameError as error:
            raise ArgumentError("task", f"cannot resolve the field types of {dtype.__name__} ({error}); "
                                        f"define it at module level with importable annotations.")
        for field in dataclasses.fields(dtype):
            if field.init:
                field.type = hints[field.name]
                added = len(group._group_actions)
                self._parse_dataclass_field(group, field)
                for action in group._group_actions[added:]:
                    _clarify(action, field, hints[field.name])


def _clarify(action: Any, field: dataclasses.Field, hint: Any) -> None:
    """`--no_<name>` says what it turns off (argparse showed the field's help with "default: False", the opposite);
    an Optional field of one value (a number, a boolean, a string) accepts `none` / `null` to unset it, as a config
    file's `null` does, so a value from `--config` can be unset on the command line. A list (`eval_metrics`) keeps
    its own meaning of 'none', and a choice its choices."""
    if action.option_strings[0].startswith("--no_"):
        action.help, action.default = f"Turn off --{field.name}.", argparse.SUPPRESS
    elif (type(None) in typing.get_args(hint) and action.type is not None and action.choices is None
          and action.nargs not in ("+", "*")):
        action.type = _or_none(action.type)


def _or_none(convert: Callable[[str], Any]) -> Callable[[str], Any]:
    def parse(text: str) -> Any:
        return None if text.strip().lower() in ("none", "null") else convert(text)

    parse.__name__ = convert.__name__  # argparse names the type in its error ("invalid int value")
    return parse


#: The name the `easytrain train` command's help and errors give; a script's own parse gives its own (`prog=None`).
CLI_PROG = "easytrain train"


def build_parser(task_arguments: Sequence[type] = (), task: str | None = None,
                 prog: str | None = CLI_PROG) -> HfArgumentParser:
    """One parser over `TrainingArguments` and the task's dataclasses (a flag declared twice is refused), named
    `prog` in its help and errors: the command's, or (None) the running script's, as argparse names it."""
    check_argument_dataclasses(task_arguments, task=task or "?")
    name = task or "lm"
    titles = {TrainingArguments: "training arguments (TrainingArguments, shared by every task)",
              **{cls: f"task {name!r} arguments ({cls.__name__})" for cls in task_arguments}}
    command = prog == CLI_PROG
    parser = _GroupedParser([TrainingArguments, *task_arguments], titles, allow_abbrev=False, prog=prog,
                            usage=f"%(prog)s {'[--task NAME] ' if command else ''}[--config FILE] [--FIELD VALUE ...]",
                            description="Train a model with easytrain. Every flag has a default; with none, a tiny "
                                        "model learns arithmetic on embedded data." if command else
                                        "easytrain's training arguments. Every flag has a default.",
                            epilog="A task's own flags show with `easytrain train --task NAME --help`; "
                                   "`easytrain tasks` lists the tasks." if command else None)
    parser.add_argument("--config", default=None,
                        help="YAML or JSON file of arguments; command-line flags override its values.")
    return parser


def peek_task(argv: Sequence[str]) -> str:
    """The task a command line selects (`--task`, else the config file's `task`, else the default), read
    before the full parse because the task decides which flags exist."""
    pre = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    pre.add_argument("--config", default=None)
    pre.add_argument("--task", default=None)
    known, _ = pre.parse_known_args(list(argv))
    if known.task:
        return known.task
    if known.config:
        values = load_config_file_values(known.config)
        if isinstance(values.get("task"), str):
            return values["task"]
    return _DEFAULT_TASK


def load_config_file_values(path: str | os.PathLike) -> dict[str, Any]:
    """The raw mapping of a config file, unchecked (checked later by `load_config_file`)."""
    path = Path(path)
    if not path.is_file() or path.suffix not in (".yaml", ".yml", ".json"):
        return {}
    values = _parse(path)
    return values if isinstance(values, dict) else {}


def _parse(path: Path) -> Any:
    """The file's YAML or JSON value; a file that does not parse is refused with its line, column and the parser's
    message, before anything starts (an empty YAML file is an empty mapping)."""
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        raise ArgumentError("config", f"{str(path)!r} is not UTF-8 text ({error.reason} at byte {error.start}); "
                                      "save it as a UTF-8 .yaml or .json file.") from None
    if path.suffix == ".json":
        try:
            return json.loads(text)
        except json.JSONDecodeError as error:
            raise ArgumentError("config", f"{str(path)!r} is not valid JSON: line {error.lineno} column "
                                          f"{error.colno}: {error.msg}.") from None
    try:
        return yaml.safe_load(text) or {}
    except yaml.YAMLError as error:
        raise ArgumentError("config", f"{str(path)!r} is not valid YAML: {_yaml_problem(error)}.") from None


def _yaml_problem(error: yaml.YAMLError) -> str:
    """`line L column C: problem (context)`, 1-based like an editor; tabs get the rule they broke."""
    mark = getattr(error, "problem_mark", None)
    where = f"line {mark.line + 1} column {mark.column + 1}: " if mark is not None else ""
    problem = getattr(error, "problem", None) or str(error)
    context = getattr(error, "context", None)
    hint = "; YAML indents with spaces, not tabs" if "'\\t'" in problem else ""
    return f"{where}{problem}{f' ({context})' if context else ''}{hint}"


def parse_arguments(argv: Sequence[str] | None = None, prog: str | None = None) -> TrainingArguments:
    """Parse `[--config FILE] [--field value ...]` into validated `TrainingArguments`. `argv` None reads the
    command line (`sys.argv[1:]`), as argparse does, so a script of one's own takes flags; `[]` means none. Its
    `--help` and errors name `prog`: None, the script (argparse's default, e.g. `my_train.py`)."""
    return parse_task_arguments(argv, prog=prog)[0]


def parse_task_arguments(argv: Sequence[str] | None = None, task_arguments: Sequence[type] = (),
                         task: str | None = None, prog: str | None = None) -> tuple[TrainingArguments,
                                                                                   tuple[Any, ...]]:
    """Parse a command line into `TrainingArguments` and one instance of each of the task's dataclasses (`argv`
    None: `sys.argv[1:]`, as in `parse_arguments`). Help and errors name `prog`: None, the running script (as in
    `parse_arguments`); the `easytrain train` command passes its own (`CLI_PROG`)."""
    from_command_line, argv = argv is None, list(sys.argv[1:] if argv is None else argv)
    pre = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    pre.add_argument("--config", default=None)
    known, _ = pre.parse_known_args(argv)
    parser = build_parser(task_arguments, task, prog)
    config = load_config_file(known.config, task_arguments, task, prog) if known.config else {}
    parser.set_defaults(**({"task": task} if task else {}) | config)  # the task whose dataclasses are read
    try:
        outputs = parser.parse_args_into_dataclasses(args=argv, return_remaining_strings=True)
    except ArgumentError as error:  # a file's value, typed: the command line's are refused by argparse first
        given_here = any(arg.startswith("--") and arg[2:].split("=", 1)[0].replace("-", "_") == error.field
                         for arg in argv)  # `--warmup-steps` is an alias of `--warmup_steps`
        if error.field not in config or given_here:
            raise
        hint = transformers_value_hint(error.field, config[error.field])
        message = error.message.replace(hint, "") if hint else error.message  # Python's refusal may hold it already
        raise ArgumentError(error.field, f"{message.rstrip('.')} in {known.config}.{hint}") from None
    remaining = outputs[-1]
    if remaining:
        error = _unknown_flag_error(remaining, _known_fields(task_arguments), _Parse(task, task_arguments, prog))
        if from_command_line:  # the caller gave no argv: it may not know whose flags these are (a notebook's kernel)
            raise ArgumentError(error.field, f"{error.message} The flags were read from the command line "
                                             f"(sys.argv[1:] = {argv}); pass [] for none, e.g. in a notebook, whose "
                                             "kernel passes -f.") from None
        raise error
    if task and outputs[0].task != task:
        raise _other_task_error(task, outputs[0].task, known.config)
    count = 1 + len(task_arguments)
    for values, cls in zip(outputs[1:count], task_arguments):
        check_given_values(values, cls)  # TrainingArguments checks its own; a task's fields get the same checks
    return outputs[0], tuple(outputs[1:count])


def _other_task_error(task: str, named: str, config: str | None) -> ArgumentError:
    """A script's parse of `task`'s dataclasses given `--task named` (or a config file's `task: named`): the run would
    pair one task's trainer with another's arguments (the command reads `--task` first, so never meets this)."""
    where = f"--task or {config}" if config else "--task"
    return ArgumentError("task", f"this parse reads the arguments of task {task!r}, but {where} names task {named!r}; "
                                 f"leave it out (or give {task!r}), or parse that task's with "
                                 f"parse_task_arguments(argv, resolve_task({named!r}).arguments, {named!r}).")


def _listing(parse: _Parse) -> str:
    """Whose `--help` lists a parse's flags: the command's (with its `--task`), or the running script's (argparse's
    default name)."""
    if parse.prog != CLI_PROG:
        return parse.prog or os.path.basename(sys.argv[0])
    return CLI_PROG if (parse.task or _DEFAULT_TASK) == _DEFAULT_TASK else f"{CLI_PROG} --task {parse.task}"


def _known_fields(task_arguments: Sequence[type]) -> list[str]:
    return field_names() + [f.name for cls in task_arguments for f in dataclasses.fields(cls) if f.init]


class _Parse(typing.NamedTuple):
    """What a parse reads (`task`, whose dataclasses are `task_arguments`) and whose it is (`prog`): another task's
    argument is fixed by the command's `--task`, or by a script's parse of that task's dataclasses."""

    task: str | None
    task_arguments: Sequence[type]
    prog: str | None


def _unknown_flag_error(remaining: list[str], known: list[str], parse: _Parse) -> ArgumentError:
    """Another task's flag names that task (its `--help` lists it, this one's does not); else the closest flag."""
    flag = next((r for r in remaining if r.startswith("-")), remaining[0])
    name = flag.lstrip("-").split("=")[0].replace("-", "_")
    chosen = parse.task or _DEFAULT_TASK
    if (owners := tasks_declaring(name, besides=chosen)) and parse.prog != CLI_PROG:
        return ArgumentError(name, f"--{name} is an argument of {_tasks(owners)}; {_script_fix(owners[0], parse)}")
    if owners:
        return ArgumentError(name, f"--{name} is an argument of {_tasks(owners)}, not of task {chosen!r}; add "
                                   f"--task {owners[0]} (`easytrain train --task {owners[0]} --help` lists its flags).")
    hint = unknown_name_hint(name, _flag_value(remaining, flag), known, as_flags, _listing(parse))
    return ArgumentError(name, f"unknown command-line argument {flag!r}. {hint}")


def _script_fix(owner: str, parse: _Parse) -> str:
    """For a script's parse (not the command's): what it reads, which its `task` field does not change, and the
    parse that reads `owner`'s arguments (docs/tasks.md)."""
    own = ", ".join(cls.__name__ for cls in parse.task_arguments)
    reads = f"TrainingArguments and task {parse.task or _DEFAULT_TASK!r} ({own})" if own else "TrainingArguments"
    return (f"this parse reads {reads} only, whatever --task or a config file's `task` says: to read the arguments "
            f"of task {owner!r}, parse with easytrain.config_io.parse_task_arguments(argv, task.arguments, task.name), "
            f"where task = easytrain.tasks.resolve_task({owner!r}) (docs/tasks.md).")


def _flag_value(remaining: list[str], flag: str) -> str | None:
    """What the command line gives an unknown `flag`: after its '=', else the next string unless that is a flag
    (None: a bare flag, which transformers reads as true for a boolean)."""
    if "=" in flag:
        return flag.split("=", 1)[1]
    after = remaining[remaining.index(flag) + 1:]
    return after[0] if after and not after[0].startswith("--") else None


def _unknown_key_error(key: str, value: Any, path: Path, known: list[str], parse: _Parse) -> ArgumentError:
    """As `_unknown_flag_error`, for a key of a config file (and its value)."""
    chosen = parse.task or _DEFAULT_TASK
    if (owners := tasks_declaring(key, besides=chosen)) and parse.prog != CLI_PROG:
        return ArgumentError(key, f"an argument of {_tasks(owners)} (in {path}); {_script_fix(owners[0], parse)}")
    if owners:
        return ArgumentError(key, f"an argument of {_tasks(owners)}, not of task {chosen!r} (in {path}); add "
                                  f"`task: {owners[0]}` to the file or --task {owners[0]} to the command.")
    return ArgumentError(key, f"unknown argument in {path}. "
                              f"{unknown_name_hint(key, value, known, as_keys, _listing(parse))}")


def _tasks(names: list[str]) -> str:
    return f"task {names[0]!r}" if len(names) == 1 else f"tasks {', '.join(map(repr, names))}"


def save_arguments(arguments: TrainingArguments, directory: str | os.PathLike,
                   task_arguments: Sequence[Any] = ()) -> Path:
    """Write `arguments.json` atomically, so a crash never leaves half a file. The task's argument dataclasses
    are saved beside `TrainingArguments`, flat, as a `--config` file holds them: the file reruns the whole job. A
    `greater_is_better` inferred from the metric's name is saved unset (`saved_values`)."""
    values = saved_values(arguments)
    for extra in task_arguments:
        values.update(dataclasses.asdict(extra))
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / ARGUMENTS_FILE
    replace_through_link(path, json.dumps(values, indent=2).encode("utf-8"))  # a link stays one: its target is written
    return path


def load_arguments(path: str | os.PathLike) -> TrainingArguments:
    """The `TrainingArguments` written by `save_arguments` (a file or the directory holding it); the task's
    fields beside them are left out (`easytrain train --config arguments.json` reads both)."""
    path = Path(path)
    if path.is_dir():
        path = path / ARGUMENTS_FILE
    values = json.loads(path.read_text())
    return TrainingArguments.from_dict({name: values[name] for name in field_names() if name in values})


def to_yaml(arguments: TrainingArguments) -> str:
    """The arguments as a YAML `--config` file, as `save_arguments` writes them."""
    return yaml.safe_dump(saved_values(arguments), sort_keys=False)
