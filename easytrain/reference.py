"""Render the `TrainingArguments` reference as Markdown, straight from the dataclass.

`python -m easytrain.reference > docs/arguments.md`; a test fails when the file is stale.
"""

from __future__ import annotations

import dataclasses
import types
import typing

from easytrain.arguments import TrainingArguments

HEADER = """# Arguments reference

Generated from `easytrain.TrainingArguments` by `python -m easytrain.reference > docs/arguments.md`;
do not edit by hand. Every field is a command-line flag (`--name value`), a key of a `--config`
YAML/JSON file, and a keyword of `TrainingArguments(...)`. Booleans that default to true are
turned off with `--no_name`. A path, name or column given as an empty string is refused (leave the
field unset instead), except where `''` has a meaning said below.

| argument | type | default | description |
| --- | --- | --- | --- |
"""


def _type_name(annotation: typing.Any) -> str:
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is typing.Literal:
        return " \\| ".join(repr(arg) for arg in args)
    if origin is typing.Union or origin is types.UnionType:  # Optional[str] and str | None
        return " \\| ".join(_type_name(arg) for arg in args if arg is not type(None)) + " (optional)"
    if origin is list:
        return f"list[{_type_name(args[0])}]"
    return getattr(annotation, "__name__", str(annotation))


def render_markdown() -> str:
    hints = typing.get_type_hints(TrainingArguments)
    rows = []
    for field in dataclasses.fields(TrainingArguments):
        default = field.default_factory() if field.default_factory is not dataclasses.MISSING else field.default
        rows.append(f"| `{field.name}` | {_type_name(hints[field.name])} | `{default!r}` | "
                    f"{field.metadata['help']} |")
    return HEADER + "\n".join(rows) + "\n"


if __name__ == "__main__":
    print(render_markdown(), end="")
