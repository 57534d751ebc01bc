"""A fixed "today" for chat templates that print the date, so rendered training data never depends on the clock.

Stock Llama 3.1/3.2 templates (and others) call ``strftime_now(format)``, which transformers answers with the
current time: the same row would render to different token ids on another day (a resumed run would then see
its data changed) or in processes either side of midnight. The data pipeline renders with ``strftime_now``
answering for ``TEMPLATE_DATE`` instead: a constant, so every process, resume and rerun agrees and the
tokenised-data cache stays valid. It is 26 July 2024, the date Llama 3.1/3.2 templates print when no clock is
given. To train with another date, write it into the template (``chat_template``).
"""

from __future__ import annotations

import datetime

#: The moment ``strftime_now`` reports when rendering data (midnight).
TEMPLATE_DATE = datetime.datetime(2024, 7, 26)

_DIRECTIVES = ("%-d", "%-m", "%-H", "%-I", "%-M", "%-S", "%-j", "%Y", "%y", "%m", "%d", "%e", "%b", "%B", "%h",
               "%a", "%A", "%H", "%I", "%M", "%S", "%p", "%j", "%F", "%D", "%T", "%u", "%w")


def _macro() -> str:
    """A Jinja macro ``strftime_now(format)`` that formats ``TEMPLATE_DATE`` (common directives, then ``%%``)."""
    chain = "".join(f"|replace({directive!r}, {TEMPLATE_DATE.strftime(directive)!r})" for directive in _DIRECTIVES)
    return "{% macro strftime_now(format) %}{{ format" + chain + "|replace('%%', '%') }}{% endmacro %}"


_MACRO = _macro()


def with_fixed_date(template: str) -> str:
    """``template`` with ``strftime_now`` reporting ``TEMPLATE_DATE``; unchanged when it never calls it.

    The macro renders nothing where it is defined, so the output, and the character positions of its
    generation blocks, are the template's own.
    """
    return _MACRO + template if "strftime_now" in template else template
