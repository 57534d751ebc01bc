"""What every benchmark ends with: its result as one JSON line on stdout, also written to `--out`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def emit(result: dict[str, Any], out: str | None) -> dict[str, Any]:
    """Print `result` as one JSON line (the runner reads it), write it to `out` when given, return it."""
    line = json.dumps(result)
    print(line)
    if out:
        Path(out).write_text(line + "\n")
    return result
