"""The `easytrain` command (and `python -m easytrain`): relaunch first, then import the rest.

`easytrain train` on a CPU relaunches its own process with an allocator setting that glibc reads only at
start-up (`easytrain.host_memory`). The relaunch replaces the process, so whatever it had imported is
imported again: this module imports nothing but `host_memory` and `stop_signals` (the standard library) before
deciding, and loads JAX, `transformers`, `datasets` and the trainers once, in the process that runs. From there on
a SIGTERM or SIGINT is caught: during the imports (seconds, nothing written) it ends the command at once with
status 75, later at the run's next safe point (`easytrain.stop_signals`).
"""

from __future__ import annotations

import sys

from easytrain import host_memory, stop_signals


def main() -> int:
    if sys.argv[1:2] == ["train"]:
        host_memory.relaunch_with_huge_pages()
        stop_signals.catch()  # after the relaunch: `exec` would reset the handlers
    try:
        with stop_signals.interruptible("starting"):
            from easytrain.cli import main as run_command
        return run_command()
    except stop_signals.SignalInterrupt as stop:  # before the run's train() took the catch over: nothing done
        print(f"easytrain: stopped by {stop.signal_name} while {stop.during}; exit status "
              f"{stop_signals.PREEMPTED_EXIT_CODE}", file=sys.stderr)
        return stop_signals.PREEMPTED_EXIT_CODE
