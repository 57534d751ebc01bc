"""Contenders in child processes of their own, all alive at once, timed one window at a time in turn.

A machine shared with other guests slows down in stretches of tens of seconds. Where each contender's
process runs its whole timed part in one go, one such stretch falls on one contender: it moved
`versus_torch`'s ratios by 10-30% from round to round (docs/benchmarks.md, "Against PyTorch"). Here the
children start one at a time (so that no compile or warm-up overlaps another's), each stops at a gate before
its first timed window, and the parent then opens one gate at a time: every child times one window per turn,
in an order that rotates between turns. Neighbouring windows of different contenders are then seconds apart,
and a slow stretch falls on all of them alike. Only one child computes at a time, so each has the whole
machine, as a contender alone would.

Child side: `Gate.parse(value_of_--gate)`, then `gate.wait()` before each timed window. Parent side:
`take_turns`.
"""

from __future__ import annotations

import json
import os
import subprocess
import tempfile
from typing import Any

READY, GO = b"r", b"g"


class Gate:
    """The child's end: `wait()` tells the parent it is ready for its next window and blocks until told to go."""

    def __init__(self, go_fd: int, ready_fd: int):
        self.go_fd, self.ready_fd = go_fd, ready_fd

    @classmethod
    def parse(cls, value: str | None) -> "Gate | None":
        """The gate a child was given as `--gate GO_FD,READY_FD`; None without one (the child runs straight on)."""
        if not value:
            return None
        go_fd, ready_fd = (int(fd) for fd in value.split(","))
        return cls(go_fd, ready_fd)

    def wait(self) -> None:
        os.write(self.ready_fd, READY)
        if os.read(self.go_fd, 1) != GO:
            raise SystemExit("the benchmark's parent process closed the gate: stopping")


class GatedChild:
    """One contender's process, started with `--gate` appended to `argv`; its output goes to temporary files
    (a pipe the parent does not drain while it waits at a gate could fill and stall the child)."""

    def __init__(self, argv: list[str], env: dict[str, str] | None = None):
        go_read, self.go_write = os.pipe()
        self.ready_read, ready_write = os.pipe()
        self.stdout, self.stderr = tempfile.TemporaryFile(), tempfile.TemporaryFile()
        self.argv = argv
        try:
            self.process = subprocess.Popen([*argv, "--gate", f"{go_read},{ready_write}"], env=env,
                                            pass_fds=(go_read, ready_write), stdout=self.stdout, stderr=self.stderr)
        finally:  # the child holds its own copies: a child that dies then reads as end of file here
            os.close(go_read)
            os.close(ready_write)

    def wait_ready(self) -> None:
        """Block until the child is at its gate; raise with the end of its stderr if it exited instead."""
        if os.read(self.ready_read, 1) != READY:
            self.process.wait()
            raise self.failure()

    def go(self) -> None:
        os.write(self.go_write, GO)

    def result(self) -> dict[str, Any]:
        """Wait for the child to finish; the JSON of its last stdout line."""
        if self.process.wait() != 0:
            raise self.failure()
        self.stdout.seek(0)
        return json.loads(self.stdout.read().decode().strip().splitlines()[-1])

    def failure(self) -> RuntimeError:
        self.stderr.seek(0)
        return RuntimeError(f"{' '.join(self.argv)} failed (exit {self.process.returncode}):\n"
                            f"{self.stderr.read().decode(errors='replace')[-3000:]}")

    def close(self) -> None:
        """Stop the child if it still runs, and release the pipes and files."""
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()
        for fd in (self.go_write, self.ready_read):
            os.close(fd)
        self.stdout.close()
        self.stderr.close()


def take_turns(commands: dict[str, list[str]], windows: int, first: int = 0,
               env: dict[str, str] | None = None) -> dict[str, dict[str, Any]]:
    """Run each command as a `GatedChild` that waits at its gate once before each of `windows` timed windows.
    The children start one at a time, each only once the one before is at its gate. Then come `windows` turns:
    in each, every child times one window while the others wait. The order of the turn starts at contender
    `first + turn` (mod their number). After the last turn each child finishes on its own. Returns each
    command's JSON result, by name."""
    names = list(commands)
    children: dict[str, GatedChild] = {}
    try:
        for name in names:
            children[name] = GatedChild(commands[name], env)
            children[name].wait_ready()
        results = {}
        for turn in range(windows):
            start = (first + turn) % len(names)
            for name in names[start:] + names[:start]:
                children[name].go()
                if turn < windows - 1:
                    children[name].wait_ready()
                else:  # its last window: it finishes, alone, before the next one's starts
                    results[name] = children[name].result()
        return results
    finally:
        for child in children.values():
            child.close()
