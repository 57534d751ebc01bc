"""Field-level checks of `TrainingArguments`, run first by `validate` (before any comparison could raise a bare
`TypeError`): each value has its field's type, and numbers are in a meaningful range.

Types are strict from Python: `TrainingArguments(...)` takes typed values and never parses strings (the command
line and `--config` files parse them). Two forgiving normalisations, both unambiguous:

* a single string for a list field (`report_to`, `eval_metrics`) is a one-element list, as in Hugging Face's
  `TrainingArguments`; `lora_target_modules` keeps PEFT's meaning of a string (one regular expression); a tuple
  for a list field is a list;
* YAML 1.1 reads an unquoted `no` as `False`: a choice field whose choices include 'no' takes `False` as 'no';
* `eval_metrics` 'none' alone is the empty list (no metrics), as `report_to` 'none' is no sink: the command line
  cannot spell an empty list.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
import types
import typing
from collections.abc import Sequence
from typing import Any, Literal, Union

from easytrain.best_metric_direction import resolve_best_metric  # noqa: F401 - validate's step
from easytrain.errors import ArgumentError
from easytrain.precision_warnings import warn_bfloat16_state, warn_low_precision_state  # noqa: F401 - re-exported

#: List fields that take a single string as a one-element list.
STRING_AS_LIST = ("report_to", "eval_metrics")
#: List fields whose value 'none' alone means the empty list.
NONE_AS_EMPTY = ("eval_metrics",)
logger = logging.getLogger("easytrain")
_YAML_BOOL_HINT = " YAML reads unquoted yes/no/on/off/true/false as booleans: quote the value."


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _split_optional(hint: Any) -> tuple[Any, bool]:
    if typing.get_origin(hint) in (Union, types.UnionType):
        members = [arg for arg in typing.get_args(hint) if arg is not type(None)]
        if len(members) == 1 and len(typing.get_args(hint)) == 2:
            return members[0], True
    return hint, False


def normalize(args: Any, cls: type) -> None:
    """The normalisations above, in place, over the fields of the dataclass `cls` (before `check_types`)."""
    for field in dataclasses.fields(cls):
        value = original = getattr(args, field.name)
        if field.name in STRING_AS_LIST and isinstance(value, str):
            value = [value]
        elif isinstance(value, tuple) and typing.get_origin(_split_optional(_hints(cls)[field.name])[0]) is list:
            value = list(value)  # so that the JSON/YAML round trip gives an equal object
        elif value is False:
            hint, _ = _split_optional(_hints(cls)[field.name])
            if typing.get_origin(hint) is Literal and "no" in typing.get_args(hint):
                value = "no"
        if field.name in NONE_AS_EMPTY and value == ["none"]:
            value = []
        if value is not original:
            setattr(args, field.name, value)


def _shown(value: Any) -> str:
    return f"{value!r} ({type(value).__name__})"


def _string_fix(name: str, value: Any, kind: type) -> str:
    """For a numeric string given from Python: the typed spelling to use instead."""
    try:
        parsed = kind(value.strip())
    except (ValueError, AttributeError):
        return ""
    return f" Pass {name}={parsed!r}: the argument dataclasses take typed values from Python (strings are parsed " \
           f"only on the command line and in --config files)."


def check_types(args: Any, cls: type) -> None:
    """Every field holds a value of its declared type: int fields an int (not a bool, not a float), float fields
    a finite int or float, str fields a string, bool fields a bool, list fields a list of their element type;
    None only where the field is Optional. Only `cls`'s fields: a subclass's own fields are its own to check."""
    for field in dataclasses.fields(cls):
        _check_value(field, getattr(args, field.name), _hints(cls)[field.name])


def _check_value(field: dataclasses.Field, value: Any, declared: Any) -> None:
    name = field.name
    hint, optional = _split_optional(declared)
    if value is None:
        if not optional:
            raise ArgumentError(name, f"must be {_describe(hint)}, got None; leave it out for the default "
                                      f"{field.default!r}." if field.default is not dataclasses.MISSING
                                else f"must be {_describe(hint)}, got None.")
        return
    if not _matches(hint, value):
        a = _describe(hint) + (" or None" if optional else "")
        bool_hint = _YAML_BOOL_HINT if isinstance(value, bool) and (hint is str or "list" in a) else ""
        kind = {int: int, float: float}.get(hint)
        fix = _string_fix(name, value, kind) if kind and isinstance(value, str) else ""
        if not fix and hint is int and isinstance(value, float) and value.is_integer():
            fix = f" Write {int(value)}."
        from easytrain.argument_values import transformers_value_hint  # here: argument_values imports this module

        hint_text = transformers_value_hint(name, value)
        raise ArgumentError(name, f"must be {a}, got {_shown(value)}.{bool_hint}{fix}{hint_text}")
    if hint is float and not math.isfinite(value):
        default = f" (the default is {field.default!r})" if isinstance(field.default, (int, float)) else ""
        raise ArgumentError(name, f"must be a finite number, got {value!r}; give a real number{default}.")
    if typing.get_origin(hint) is list and typing.get_args(hint) == (float,) and not all(map(math.isfinite, value)):
        raise ArgumentError(name, f"must be a list of finite numbers, got {value!r}; give real numbers (no NaN or "
                                  "infinity).")


#: String fields whose '' means something (XLA's own options, JAX's own cache, no stop file, no resume).
EMPTY_ALLOWED = ("compiler_options", "compilation_cache_dir", "stop_file", "resume_from_checkpoint")


def check_choices(args: Any, cls: type) -> None:
    """Every `Literal` field of `cls` holds one of its choices (`check_types` leaves choices to the caller)."""
    for field in dataclasses.fields(cls):
        hint, optional = _split_optional(_hints(cls)[field.name])
        value = getattr(args, field.name)
        if typing.get_origin(hint) is Literal and not (optional and value is None):
            choices = typing.get_args(hint)
            if value not in choices or isinstance(value, bool):
                raise ArgumentError(field.name, f"must be one of {', '.join(map(repr, choices))}, got "
                                                f"{_shown(value)}.{choice_hint(value)}")


def check_not_blank(args: Any, cls: type) -> None:
    """A path, name or column given as '' (or spaces) is refused, not read as unset: `--train_file "$FILE"` with
    the variable empty would otherwise train the embedded task, `init_weights_from=''` start from random weights."""
    for field in dataclasses.fields(cls):
        value = getattr(args, field.name)
        if field.name in EMPTY_ALLOWED or not isinstance(value, str) or value.strip():
            continue
        _, optional = _split_optional(_hints(cls)[field.name])
        fix = (f"leave it unset (omit the flag or pass --{field.name} none; null in a config file)" if optional
               else f"leave it out for the default {field_defaults(cls)[field.name]!r}")
        raise ArgumentError(field.name, f"is empty ({value!r}); give a value, or {fix}.")


#: The optional paths and names an easytrain before `check_not_blank` read as unset when given ''
#: (TrainingArguments', SFT's and DPO's): a checkpoint may record '' for them, which its rerun must now give as None.
BLANK_WAS_UNSET = ("model_name_or_path", "init_weights_from", "tokenizer_name", "lora_adapter_path", "dataset_name",
                   "dataset_config_name", "train_file", "validation_file", "metric_for_best_model",
                   "compilation_cache_dir", "chat_template_path", "ref_model_name_or_path")


def same_setting(name: str, stored: Any, current: Any) -> bool:
    """Whether a checkpoint's recorded value of `name` and this run's are one setting: '' and None are for
    `BLANK_WAS_UNSET` (a task's own setting keeps its '': an empty system prompt is not none)."""
    return stored == current or (name in BLANK_WAS_UNSET and stored in ("", None) and current in ("", None))


def check_given_values(args: Any, cls: type) -> None:
    """`check_types` over the fields of a task's dataclass `cls` whose value is not its default (after `normalize`):
    what a command line gives reaches the dataclass parsed but unchecked (NaN, infinity), while a default is the
    task author's, not the user's, and may be looser than its annotation (`note: str = None`)."""
    normalize(args, cls)
    defaults = field_defaults(cls)
    for field in dataclasses.fields(cls):
        value = getattr(args, field.name)
        if field.init and not _is_default(value, defaults[field.name]):
            _check_value(field, value, _hints(cls)[field.name])


def _is_default(value: Any, default: Any) -> bool:
    if value is default:
        return True
    try:
        return type(value) is type(default) and bool(value == default)
    except Exception:  # noqa: BLE001 - a value whose comparison raises (an array) is checked, not trusted
        return False


def check_file_values(values: dict[str, Any], classes: Sequence[type], source: str | None = None) -> dict[str, Any]:
    """A `--config` file's values for the fields of `classes` (a task's own dataclasses), checked and normalised
    as `TrainingArguments` checks its own: argparse parses only the file's strings (with the field's type), and
    checks no choice, so any other value would reach the dataclass as it is. A string for a list field is a
    one-element list; YAML's `no` (False) is 'no' where that is a choice. A string for a number or boolean field
    must parse as its flag's would: refused here, naming `source` (the file), not as a flag the user never typed."""
    checked = dict(values)
    for cls in classes:
        for field in dataclasses.fields(cls):
            if not field.init or field.name not in values:
                continue
            value, declared = values[field.name], _hints(cls)[field.name]
            hint, _ = _split_optional(declared)
            if typing.get_origin(hint) is list and isinstance(value, str):
                value = checked[field.name] = [value]
            if isinstance(value, list) and typing.get_args(hint) in ((int,), (float,)):
                value = checked[field.name] = _numbers(value, typing.get_args(hint)[0])
            if typing.get_origin(hint) is Literal:
                choices = typing.get_args(hint)
                if value is False and "no" in choices:
                    value = checked[field.name] = "no"
                if value is not None and value not in choices:
                    raise ArgumentError(field.name, f"must be one of {', '.join(map(repr, choices))}, got "
                                                    f"{_shown(value)}.{choice_hint(value)}")
            elif isinstance(value, str) and hint in (int, float, bool):  # those strings argparse parses
                _check_parses(field.name, value, hint, source)
            else:
                _check_value(field, value, declared)
    return checked


def _numbers(items: list[Any], kind: type) -> list[Any]:
    """A file's list for a list[int] / list[float] field with its strings parsed (YAML 1.1 reads `1e-1`, without a
    dot, as a string, and converts no list item as argparse converts a single value); unchanged if one does not
    parse, to be refused whole by the type check."""
    try:
        return [kind(item.strip()) if isinstance(item, str) else item for item in items]
    except ValueError:
        return items


def check_file_strings(values: dict[str, Any], classes: Sequence[type], source: str | None = None) -> None:
    """A `--config` file's strings for the number and boolean fields of `classes` parse as their flags' would
    (argparse parses them later, and would blame a flag the user never typed)."""
    for cls in classes:
        hints = _hints(cls)
        for field in dataclasses.fields(cls):
            if field.init and isinstance(value := values.get(field.name), str):
                hint, _ = _split_optional(hints[field.name])
                if hint in (int, float, bool):
                    _check_parses(field.name, value, hint, source)


def _check_parses(name: str, value: str, hint: type, source: str | None) -> None:
    """A file's string for a number or boolean field parses as the command line would parse it."""
    from transformers.hf_argparser import string_to_bool  # the parser of HfArgumentParser's boolean flags

    try:
        (string_to_bool if hint is bool else hint)(value)
    except Exception:  # noqa: BLE001 - int and float raise ValueError, string_to_bool argparse's own error
        where = f" in {source}" if source else ""
        raise ArgumentError(name, f"must be {_describe(hint)}, got {value!r}{where}.") from None


def _matches(hint: Any, value: Any) -> bool:
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is str:
        return isinstance(value, str)
    if typing.get_origin(hint) is Literal:
        return True  # the choice check in `validate` names the choices
    if typing.get_origin(hint) is list:
        (element,) = typing.get_args(hint) or (Any,)
        if element is str and isinstance(value, str):
            return True  # a plain string where PEFT allows one (lora_target_modules) is checked by lora_config
        return isinstance(value, list) and all(_matches(element, v) for v in value)
    return True


def _describe(hint: Any) -> str:
    if typing.get_origin(hint) is list:
        element = (typing.get_args(hint) or (str,))[0]
        return {int: "a list of integers", float: "a list of numbers"}.get(element, "a list of strings")
    return {bool: "True or False", int: "an integer", float: "a number", str: "a string"}.get(hint, str(hint))


def choice_hint(value: Any) -> str:
    """Appended to a 'must be one of' message when YAML turned the value into a boolean."""
    return _YAML_BOOL_HINT if isinstance(value, bool) else ""


def field_defaults(arguments: Any) -> dict[str, Any]:
    """Field name -> default of an arguments dataclass (or instance): what "left at its default" compares with."""
    return {field.name: field.default_factory() if field.default_factory is not dataclasses.MISSING else field.default
            for field in dataclasses.fields(arguments)}
