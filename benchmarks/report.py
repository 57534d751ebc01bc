"""What every benchmark ends with: its result as one JSON line on stdout, also written to `--out`."""

from __future__ import annotations

import atexit
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any


def relaunch_like_the_command() -> None:
    """Run this benchmark with the malloc setting the `easytrain` command runs with (`easytrain.host_memory`:
    transparent huge pages for XLA:CPU's per-step scratch memory). Every contender it starts, PyTorch and
    EasyDeL included, inherits the environment, so all of them run in the same setting; the JSON records it
    (`glibc_tunables`). `EASYTRAIN_HUGE_PAGES=0` measures without."""
    from easytrain.host_memory import relaunch_with_huge_pages

    relaunch_with_huge_pages()


def scratch_dir(prefix: str) -> str:
    """A new temporary directory for a trainer's output (arguments, logs, checkpoints), removed when this process
    exits: a benchmark reports numbers, and repeated runs must not fill the disk with the files it trained."""
    path = tempfile.mkdtemp(prefix=prefix)
    atexit.register(shutil.rmtree, path, ignore_errors=True)
    return path


def fill_defaults(options: Any, profile: dict[str, Any]) -> None:
    """Give every option left unset on the command line (None) its value from the chosen profile."""
    for key, value in profile.items():
        if getattr(options, key, None) is None:
            setattr(options, key, value)


def step_memory(compiled: Any) -> dict[str, int] | None:
    """Argument / output / alias / temp bytes of a compiled step and its peak estimate (arguments + outputs -
    aliased + temp: what `easytrain.memory_plan` plans, without generated code); None where XLA gives none."""
    from easytrain.memory_plan import plan_of  # here: a benchmark refusing its flags imports no JAX

    plan = plan_of(compiled)
    if plan is None:
        return None
    return {"argument": plan.arguments, "output": plan.outputs, "alias": plan.donated, "temp": plan.temporaries,
            "step_peak_estimate": plan.peak - plan.code}


def compiled_memory(compiled: Any) -> dict[str, int]:
    """A compiled step's scratch bytes and its peak estimate (arguments + outputs + scratch), from XLA."""
    from easytrain.memory_plan import plan_of

    plan = plan_of(compiled)
    return {"temp": plan.temporaries, "peak_estimate": plan.arguments + plan.outputs + plan.temporaries}


def child_json(module: str, *args: str, env: dict[str, str] | None = None) -> dict[str, Any]:
    """Run `python -m module args...` and return the JSON of its last stdout line; a failure raises with the
    end of its stderr (contenders run in child processes of their own: cold compiles, separate memory)."""
    done = subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True, env=env)
    if done.returncode != 0:
        raise RuntimeError(f"{module} {' '.join(args)} failed (exit {done.returncode}):\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def emit(result: dict[str, Any], out: str | None) -> dict[str, Any]:
    """Print `result` as one JSON line (the runner reads it), write it to `out` when given, return it."""
    result = {**result, "glibc_tunables": os.environ.get("GLIBC_TUNABLES", "")}
    line = json.dumps(result)
    print(line)
    if out:
        Path(out).write_text(line + "\n")
    return result
