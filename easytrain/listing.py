"""Names in a message, a few of them: a refusal that listed every differing tensor of a model would fill a screen."""

from __future__ import annotations

from collections.abc import Iterable


def listed(names: Iterable[str], limit: int, sep: str = ", ") -> str:
    """The first `limit` of `names` joined by `sep`, then how many more there are (`a, b, and 3 more`; `sep` before
    the count too, so a list joined by '; ' reads `x: 1 vs 2; and 3 more`); all of them where they fit."""
    names = list(names)
    if len(names) <= limit:
        return sep.join(names)
    return f"{sep.join(names[:limit])}{sep}and {len(names) - limit} more"
