"""Run the ```python blocks of a Markdown page, so documented examples are tested as written.

A page's blocks run top to bottom in one namespace (a block may use what earlier blocks defined).
Each block is compiled under the page's file name with its own line numbers, so a traceback points
at the line of the Markdown file that failed.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

FENCE = re.compile(r"^```python[ \t]*\n(.*?)^```[ \t]*$", re.MULTILINE | re.DOTALL)


@dataclass(frozen=True)
class Block:
    path: Path
    line: int  # 1-based line of the block's first code line in the page
    source: str

    def __str__(self) -> str:
        return f"{self.path.name}:{self.line}"


def python_blocks(path: str | Path) -> list[Block]:
    """Every ```python block of the page, in order."""
    path = Path(path)
    text = path.read_text()
    return [Block(path, text.count("\n", 0, match.start(1)) + 1, match.group(1)) for match in FENCE.finditer(text)]


def run_block(block: Block, namespace: dict[str, Any]) -> None:
    """Execute `block` in `namespace`; errors carry the page's file name and line numbers."""
    padded = "\n" * (block.line - 1) + block.source
    exec(compile(padded, str(block.path), "exec", dont_inherit=True), namespace)  # noqa: S102


def run_page(path: str | Path, namespace: dict[str, Any] | None = None) -> dict[str, Any]:
    """Run every block of the page in order in one namespace and return it; the first failure raises,
    naming the block."""
    namespace = {"__name__": f"doc:{Path(path).name}"} if namespace is None else namespace
    for block in python_blocks(path):
        try:
            run_block(block, namespace)
        except Exception as error:
            raise AssertionError(f"the python block at {block} raised {type(error).__name__}: {error}") from error
    return namespace
