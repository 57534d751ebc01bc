"""Render conversations to token ids with a chat template, and the assistant-token mask.

A thin, checked layer over transformers' template rendering (``render_jinja_template``, as
``apply_chat_template`` renders): it picks the template (a named one by the row's tools, as
transformers does), refuses templates that cannot produce an assistant mask instead of silently
returning zeros, renders the date a template prints as a fixed one (``template_date``), builds the
mask from the generation spans and token offsets (``assistant_spans``), and cleans the ``None``
fields that Arrow adds when rows of one column have different keys.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import jinja2
from transformers import PreTrainedTokenizerBase
from transformers.utils.chat_template_utils import _compile_jinja_template, render_jinja_template

from easytrain.data.assistant_spans import assistant_tokens
from easytrain.data.errors import DataError
from easytrain.data.template_date import with_fixed_date

# The same pattern transformers uses to decide whether a template can return an assistant mask.
_GENERATION_TAG = re.compile(r"\{%-?\s*generation\s*-?%\}")

Message = Mapping[str, Any]

#: Where a user gives a chat template, in every message that asks for one (the trainers take a file, the data
#: functions a string).
GIVE_TEMPLATE = ("`--chat_template_path FILE` on the command line, `chat_template_path` of `SFTArguments`/"
                 "`DPOArguments` in Python, `tokenizer.chat_template`, or the `chat_template` of "
                 "`SFTDataOptions`/`PreferenceDataOptions`")


def chat_template_of(tokenizer: PreTrainedTokenizerBase, chat_template: str | None,
                     tools: Sequence[Any] | None = None) -> str:
    """The template to render with: ``chat_template`` if given, else the tokenizer's own.

    Named templates (a dict, e.g. ``{"default": ..., "tool_use": ...}``) are chosen as transformers
    chooses: the one ``chat_template`` names, else ``"tool_use"`` for a row with ``tools``, else ``"default"``.

    Raises:
        DataError: No template exists, or none of the named ones fits.
    """
    named = tokenizer.chat_template
    template = chat_template if chat_template is not None else named
    if isinstance(named, Mapping) and isinstance(chat_template, str) and chat_template in named:
        template = named[chat_template]
    elif isinstance(template, Mapping):
        choice = "tool_use" if tools and "tool_use" in template else "default"
        if choice not in template:
            raise DataError(
                f"The tokenizer has named chat templates {sorted(template)} but no 'default' one; name one as the "
                f"`chat_template` of `SFTDataOptions`/`PreferenceDataOptions`, or give a template: {GIVE_TEMPLATE}."
            )
        template = template[choice]
    if not isinstance(template, str) or not template:
        raise DataError(
            f"Conversational data needs a chat template, but the tokenizer has none; give one: {GIVE_TEMPLATE}."
        )
    return template


def chat_templates_of(tokenizer: PreTrainedTokenizerBase, chat_template: str | None) -> list[str]:
    """Every template a row may render with (both of ``default``/``tool_use``), to check before any row."""
    named = tokenizer.chat_template
    if chat_template is None and isinstance(named, Mapping):
        return [chat_template_of(tokenizer, None, tools) for tools in (None, [{}])]
    return [chat_template_of(tokenizer, chat_template)]


def read_chat_template(path: str | os.PathLike[str], field: str = "chat_template_path") -> str:
    """The Jinja template in the file at ``path``, checked to compile as transformers compiles it.

    Raises:
        DataError: The file does not exist or cannot be read, or the template has a syntax error.
    """
    try:
        template = Path(path).read_text()
    except (OSError, UnicodeDecodeError) as error:
        reason = "does not exist" if isinstance(error, FileNotFoundError) else f"cannot be read ({error})"
        raise DataError(f"`{field}` {os.fspath(path)!r} {reason}; pass the path of a Jinja chat template file.") \
            from error
    try:
        _compile_jinja_template(template)
    except jinja2.TemplateError as error:
        line = f" (line {error.lineno})" if getattr(error, "lineno", None) else ""
        raise DataError(f"`{field}` {os.fspath(path)!r} is not a valid Jinja template{line}: {error}; fix the "
                        "template.") from error
    return template


def has_generation_markers(template: str) -> bool:
    """Whether ``template`` marks assistant text with ``{% generation %}`` blocks."""
    return _GENERATION_TAG.search(template) is not None


def require_generation_markers(template: str) -> None:
    """Refuse a template whose assistant mask would be all zeros.

    Stock templates of Llama 3, Qwen and Gemma lack the markers; transformers then only
    warns and returns an all-zero mask, which trains on nothing while looking healthy.
    """
    if not has_generation_markers(template):
        raise DataError(
            "`assistant_only_loss=True` needs a chat template that wraps each assistant turn "
            "(content and end-of-turn token) in `{% generation %}...{% endgeneration %}`, but "
            "this template has no such markers. Add the markers to the template, give a template that has them "
            f"({GIVE_TEMPLATE}), or set `assistant_only_loss=False`."
        )


def render_chat(
    tokenizer: PreTrainedTokenizerBase,
    messages: Sequence[Message],
    *,
    template: str,
    tools: Sequence[Mapping[str, Any]] | None = None,
    add_generation_prompt: bool = False,
    assistant_mask: bool = False,
) -> tuple[list[int], list[int] | None]:
    """Token ids of the rendered conversation, and its assistant mask when asked.

    The template adds its own special tokens; the tokenizer adds none (transformers
    tokenises rendered chats with ``add_special_tokens=False``). ``strftime_now`` reports
    ``template_date.TEMPLATE_DATE``, so the ids never depend on the day they were rendered.

    Returns:
        ``(input_ids, mask)``: ``mask[i]`` is 1 where token ``i`` overlaps a
        ``{% generation %}`` block (see ``assistant_spans``), or ``None`` when ``assistant_mask`` is False.
    """
    if not messages:
        raise DataError("A conversation has no messages; give each example at least one message.")
    try:
        rendered, spans = render_jinja_template(
            conversations=[[drop_none(dict(message)) for message in messages]],
            tools=None if tools is None else [drop_none(dict(tool)) for tool in tools],
            chat_template=with_fixed_date(template),
            add_generation_prompt=add_generation_prompt,
            return_assistant_tokens_mask=assistant_mask,
            **tokenizer.special_tokens_map,
        )
    except (jinja2.TemplateError, TypeError) as error:  # TypeError: e.g. the template adds a str and a number
        raise DataError(template_failure(error, messages)) from error
    if not assistant_mask:
        return [int(token) for token in tokenizer(rendered[0], add_special_tokens=False)["input_ids"]], None
    return assistant_tokens(tokenizer, rendered[0], spans[0], template)


def template_failure(error: Exception, messages: Sequence[Message]) -> str:
    """Why the template failed on ``messages``, quoting its message, with the fix.

    Real templates refuse conversations with ``raise_exception(...)`` (e.g. roles that do not
    alternate), and a null field is dropped before rendering, so ``message.content`` is undefined.
    """
    roles = [message.get("role") if isinstance(message, Mapping) else type(message).__name__
             for message in messages]
    nulls = [f"message {i}'s {key!r}" for i, message in enumerate(messages) if isinstance(message, Mapping)
             for key, value in message.items() if value is None and key in ("role", "content")]
    null_hint = (f" The conversation has null fields ({', '.join(nulls[:3])}), which are dropped before "
                 "rendering, so the template finds them undefined." if nulls else "")
    excerpt = json.dumps([drop_none(dict(m)) if isinstance(m, Mapping) else m for m in messages], default=str)
    excerpt = excerpt if len(excerpt) <= 120 else excerpt[:117] + "..."
    return (f"The chat template failed on this conversation (roles {roles}; {excerpt}): {type(error).__name__} "
            f"\"{error}\".{null_hint} Fix the row's messages (give every message a string 'content', in the order the "
            f"template accepts), or fix the template and give it ({GIVE_TEMPLATE}).")


def parse_tools(tools: Any, column: str = "tools") -> list[dict[str, Any]] | None:
    """Tool definitions from a row: a list of JSON-schema dicts, a JSON string of one, or None."""
    if tools is None:
        return None
    if isinstance(tools, str):
        try:
            tools = json.loads(tools) if tools.strip() else None
        except json.JSONDecodeError as error:
            raise DataError(
                f"Column {column!r} holds a string that is not JSON ({error}); store tool "
                "definitions as a list of JSON-schema dicts or a JSON string of that list."
            ) from error
        if tools is None:
            return None
    if isinstance(tools, Mapping):
        tools = [tools]
    if not all(isinstance(tool, Mapping) for tool in tools):
        raise DataError(
            f"Column {column!r} must hold a list of tool definitions (JSON-schema dicts), "
            f"got {type(tools).__name__} of {[type(tool).__name__ for tool in tools][:3]}."
        )
    return [dict(tool) for tool in tools] or None


def drop_none(value: Any) -> Any:
    """``value`` without dict entries whose value is None, at every depth.

    Arrow stores a column of dicts with the union of their keys and fills missing ones
    with None; templates test keys with ``if message.tool_calls`` or render ``None``.
    """
    if isinstance(value, Mapping):
        return {key: drop_none(item) for key, item in value.items() if item is not None}
    if isinstance(value, list | tuple):
        return [drop_none(item) for item in value]
    return value
