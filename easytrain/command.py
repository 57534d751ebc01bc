"""The `easytrain` command (and `python -m easytrain`): relaunch first, then import the rest.

`easytrain train` on a CPU relaunches its own process with an allocator setting that glibc reads only at
start-up (`easytrain.host_memory`). The relaunch replaces the process, so whatever it had imported is
imported again: this module imports nothing but `host_memory` (the standard library) before deciding, and
loads JAX, `transformers`, `datasets` and the trainers once, in the process that runs.
"""

from __future__ import annotations

import sys

from easytrain import host_memory


def main() -> int:
    if sys.argv[1:2] == ["train"]:
        host_memory.relaunch_with_huge_pages()
    from easytrain.cli import main as run_command

    return run_command()
