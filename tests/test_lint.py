"""The code stays lint-clean under `[tool.ruff]` in pyproject.toml: pyflakes' findings (unused imports and
variables, undefined names) and lines of at most 120 columns."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_ruff_finds_nothing() -> None:
    done = subprocess.run([sys.executable, "-m", "ruff", "check", "--no-cache", "easytrain", "tests", "benchmarks",
                           "examples"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
