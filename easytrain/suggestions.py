"""The "did you mean" of every unknown name (arguments, config keys, tasks): one rule, so all typos read alike."""

from __future__ import annotations

import difflib
from collections.abc import Iterable, Mapping

#: Names transformers.Trainer gives what easytrain names otherwise: spelling alone would point elsewhere
#: (`data_seed` reads closest to `dataset_name`). Its `data_seed` seeds the data order alone; easytrain's `seed` seeds
#: the initialisation, the data order and the held-out split together (its help says so).
KNOWN_AS: Mapping[str, str] = {"data_seed": "seed"}


def closest(name: str, choices: Iterable[str]) -> str | None:
    """The choice `name` most likely means: its easytrain name when `KNOWN_AS` holds one, else the choice it most
    likely misspells, or None when none is close (difflib's ratio >= 0.6)."""
    choices = list(choices)
    if (known := KNOWN_AS.get(str(name))) in choices:
        return known
    matches = difflib.get_close_matches(str(name), choices, n=1)
    return matches[0] if matches else None
