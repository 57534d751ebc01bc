"""Message contents as a chat template can print them: strings, or OpenAI-style lists of text parts.

Data exported from chat APIs stores a message's content as a list of parts (``[{"type": "text", "text": ...}]``).
transformers hands such a list to the template unchanged, and a template written for strings (``{{ message['content']
}}``, Llama 3.1's ``message['content'] | trim``) prints its Python repr, which the model would then learn. So a list of
text parts is joined into one string (newline-separated, as vLLM joins them for string templates), unless the template
loops over ``message['content']`` itself, as multimodal templates (Gemma 3, Qwen2-VL) do; those get the parts. A part of
another type (image, audio) is refused: easytrain trains text models, and a placeholder without its image teaches
nothing true. Any other content that is not a string is refused too. A null content is refused for a user, assistant
or system message without ``tool_calls``: the null field is dropped before rendering, so a template printing
``message['content']`` renders an empty turn, and the model would learn an empty answer. An assistant's tool call with
a null content is OpenAI's format and renders; other roles' nulls are left to the template
(``chat_templates.template_failure`` explains them when it fails).
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from typing import Any

import jinja2
from jinja2 import nodes
from transformers.utils.chat_template_utils import _compile_jinja_template

from easytrain.data.errors import DataError

#: Joins the texts of a content's parts for templates that print the content as a string.
PART_SEPARATOR = "\n"

#: Roles whose message must have a content unless it carries ``tool_calls``.
ROLES_WITH_CONTENT = frozenset({"system", "user", "assistant"})

_FIX = ("give each message's 'content' as a string or a list of {'type': 'text', 'text': ...} parts (fix the data or "
        "the `formatting_func`)")


def messages_for_template(messages: Sequence[Any], template: str, field: str = "messages") -> list[dict[str, Any]]:
    """``messages`` as dicts whose contents ``template`` can print: text-part lists joined unless it loops over them.

    Raises:
        DataError: A message that is not a dict, a content part that is not text, a content that is neither a
            string, a list of text parts nor null, or a null content where a text is needed
            (``check_null_content``); names ``field`` and the message's index.
    """
    joins = not loops_over_content(template)
    checked = []
    for index, message in enumerate(messages):
        if not isinstance(message, Mapping):
            raise DataError(f"{field!r} message {index} is a {type(message).__name__}, not a dict with 'role' and "
                            f"'content'; {_FIX}.")
        content = message.get("content")
        check_null_content(message, f"{field!r} message {index}")
        if isinstance(content, list | tuple):
            texts = text_parts(content, f"{field!r} message {index}")
            message = {**message, "content": PART_SEPARATOR.join(texts)} if joins else dict(message)
        elif content is not None and not isinstance(content, str):
            raise DataError(f"{field!r} message {index}'s 'content' is a {type(content).__name__} "
                            f"({str(content)[:60]!r}); {_FIX}.")
        checked.append(dict(message))
    return checked


def check_null_content(message: Mapping[str, Any], where: str) -> None:
    """Refuse a null (or missing) content in a message of a role in ``ROLES_WITH_CONTENT`` without ``tool_calls``.

    Arrow fills keys that only some messages have with null, so a null ``tool_calls`` is no tool call, and a
    message of another role (``tool``, or none, as ShareGPT's ``from``/``value``) is left to the template.
    """
    role = message.get("role")
    if message.get("content") is not None or role not in ROLES_WITH_CONTENT or message.get("tool_calls"):
        return
    raise DataError(f"{where} (role {role!r}) has a null 'content' and no 'tool_calls': null fields are dropped "
                    "before the chat template renders, so it would render an empty turn (an empty answer to learn). "
                    "To fix it, give the message its text, drop the message or the row (a `formatting_func` can), "
                    "or give an assistant's tool call its 'tool_calls'.")


def content_text(content: Any, where: str) -> str:
    """A content's text: the string itself, or its text parts joined (as ``messages_for_template`` joins them)."""
    if isinstance(content, list | tuple):
        return PART_SEPARATOR.join(text_parts(content, where))
    if not isinstance(content, str):
        raise DataError(f"{where}'s 'content' is a {type(content).__name__} ({str(content)[:60]!r}); {_FIX}.")
    return content


def text_parts(parts: Sequence[Any], where: str) -> list[str]:
    """The texts of a content's parts, each checked to be ``{"type": "text", "text": str}`` (Arrow's null keys of
    other parts' fields ignored).

    Raises:
        DataError: A part of another type (named), or one that is not a text part at all.
    """
    texts = []
    for index, part in enumerate(parts):
        kind = part.get("type") if isinstance(part, Mapping) else None
        if kind is not None and kind != "text":
            raise DataError(f"{where} has a content part of type {kind!r} (part {index}); easytrain trains on text "
                            "only: drop the row or that part, or replace it with text (a `formatting_func`).")
        if kind is None or not isinstance(part.get("text"), str):
            raise DataError(f"{where}'s content part {index} is {str(part)[:60]!r}, not a text part; {_FIX}.")
        texts.append(part["text"])
    return texts


@functools.lru_cache(maxsize=32)
def loops_over_content(template: str) -> bool:
    """Whether ``template`` has a ``{% for ... in <x>.content %}`` loop (through filters too): it renders lists of
    parts itself. A template that does not parse is left to fail where it renders, with that error."""
    try:
        tree = _compile_jinja_template(template).environment.parse(template)
    except jinja2.TemplateError:
        return False
    return any(_reads_content(loop.iter) for loop in tree.find_all(nodes.For))


def _reads_content(node: nodes.Node) -> bool:
    while isinstance(node, nodes.Filter | nodes.Test) and node.node is not None:
        node = node.node
    if isinstance(node, nodes.Getattr):
        return node.attr == "content"
    return isinstance(node, nodes.Getitem) and isinstance(node.arg, nodes.Const) and node.arg.value == "content"


def roles_hint(conversations: Sequence[Any]) -> str:
    """Why these conversations may render to special tokens only: the roles (or keys) the template had to skip.

    ShareGPT's ``human``/``gpt`` roles and ``from``/``value`` keys are named with their mapping.
    """
    roles, keys = set(), set()
    for messages in conversations:
        for message in messages or ():
            if not isinstance(message, Mapping):
                continue
            if message.get("role") is not None:
                roles.add(str(message["role"]))
            else:
                keys.update(key for key, value in message.items() if value is not None)
    parts = []
    if roles:
        parts.append(f"their roles are {sorted(roles)}, which the chat template renders no text for")
    if keys:
        parts.append(f"some messages have no 'role' (their keys: {sorted(keys)})")
    sharegpt = []
    if roles & {"human", "gpt"}:
        sharegpt.append("the roles 'human'/'gpt' to 'user'/'assistant'")
    if {"from", "value"} <= keys:
        sharegpt.append("the keys 'from'/'value' to 'role'/'content'")
    if sharegpt:
        parts.append(f"this looks like ShareGPT data: map {' and '.join(sharegpt)} (e.g. with a `formatting_func`)")
    else:
        parts.append("use the roles the template renders (e.g. 'user' and 'assistant') or a template that renders "
                     "these (`chat_template`)")
    return "; ".join(parts)
