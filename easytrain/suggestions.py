"""The "did you mean" of every unknown name (arguments, config keys, tasks): one rule, so all typos read alike."""

from __future__ import annotations

import difflib
from collections.abc import Iterable


def closest(name: str, choices: Iterable[str]) -> str | None:
    """The choice `name` most likely misspells, or None when none is close (difflib's ratio >= 0.6)."""
    matches = difflib.get_close_matches(str(name), list(choices), n=1)
    return matches[0] if matches else None
