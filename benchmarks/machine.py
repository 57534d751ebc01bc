"""The machine a benchmark run measured: device, CPU (with the vector extensions that decide XLA:CPU's and
PyTorch's matmul speed), versions, load, commit and malloc setting, for the JSON of `benchmarks.run`."""

from __future__ import annotations

import datetime
import importlib.metadata
import os
import platform
import subprocess
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
#: Widest first: the first of these a CPU has is the one recorded.
VECTOR_EXTENSIONS = ("avx512f", "avx2", "avx", "sse4_2", "asimd", "neon")


def cpu_details(cpuinfo: str) -> dict[str, Any]:
    """Model name, family and model number, and the widest vector extension, from `/proc/cpuinfo` text (its
    first processor). Machines sold under one name ("AMD EPYC") differ by generation and vector width, and
    the ratios to PyTorch move with them."""
    fields: dict[str, str] = {}
    for line in cpuinfo.splitlines():
        if not line.strip():
            if fields:
                break
            continue
        key, _, value = line.partition(":")
        fields.setdefault(key.strip(), value.strip())
    flags = set((fields.get("flags") or fields.get("Features") or "").split())
    return {"cpu": fields.get("model name"), "cpu_family": fields.get("cpu family"), "cpu_model": fields.get("model"),
            "cpu_vector_extension": next((x for x in VECTOR_EXTENSIONS if x in flags), None)}


def git_commit() -> str | None:
    try:
        git = {"cwd": ROOT, "capture_output": True, "text": True, "timeout": 10}
        commit = subprocess.run(["git", "rev-parse", "HEAD"], check=False, **git)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], check=False, **git)
    except (OSError, subprocess.SubprocessError):
        return None
    return (commit.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")) if commit.returncode == 0 else None


def machine_info() -> dict[str, Any]:
    """Device kind from a short child process: the runner itself never starts a JAX backend (and its memory)."""
    probe = "import jax; d = jax.devices()[0]; print(d.platform, jax.device_count(), d.device_kind)"
    try:
        out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120,
                             check=False).stdout
        platform_name, count, kind = out.strip().split(" ", 2)
    except (OSError, subprocess.SubprocessError, ValueError):
        platform_name, count, kind = None, None, None
    cpuinfo = Path("/proc/cpuinfo")
    cpu = cpu_details(cpuinfo.read_text() if cpuinfo.exists() else "")
    return {"device_kind": kind, "platform": platform_name, "device_count": count and int(count),
            "cpu_count": os.cpu_count(), **cpu, "cpu": cpu["cpu"] or platform.processor() or None,
            "jax": importlib.metadata.version("jax"), "python": platform.python_version(),
            "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            "load_average_at_start": [round(x, 2) for x in os.getloadavg()], "git_commit": git_commit(),
            "glibc_tunables": os.environ.get("GLIBC_TUNABLES", "")}
