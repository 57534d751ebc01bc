"""Transparent huge pages for the host memory XLA:CPU allocates on every step.

XLA:CPU allocates a compiled step's scratch memory afresh on each execution (370 MB for the benchmark
Llama's train step). glibc maps a block that large with `mmap` and unmaps it on free, so every step
faults the whole block in again, 4 KiB at a time: 90,700 page faults per step there. glibc's
`glibc.malloc.hugetlb=1` tunable makes malloc ask for transparent huge pages on what it maps
(`madvise(MADV_HUGEPAGE)`, glibc 2.35 and later, for kernels whose THP mode is `madvise`): 2 MiB per
fault, 650 faults per step, and the step 1.10x faster (docs/benchmarks.md). PyTorch's step was
unchanged by it.

glibc reads tunables only when a process starts. So the `easytrain` command relaunches itself with the
tunable (`relaunch_with_huge_pages`) when JAX can only run on the CPU, and a trainer on the CPU in a
process without it logs how to set it (`advise`). `EASYTRAIN_HUGE_PAGES=0` leaves malloc as it is.
"""

from __future__ import annotations

import importlib.metadata
import logging
import os
import sys
from collections.abc import Mapping
from pathlib import Path

logger = logging.getLogger("easytrain")

TUNABLE = "glibc.malloc.hugetlb"
#: Environment variable: "0" keeps the `easytrain` command from relaunching itself with the tunable.
OPT_OUT = "EASYTRAIN_HUGE_PAGES"
THP_MODE_FILE = Path("/sys/kernel/mm/transparent_hugepage/enabled")
#: Distributions that give JAX an accelerator backend (their presence means JAX may not run on the CPU).
ACCELERATOR_PLUGINS = ("jax-cuda", "jax_cuda", "jax-rocm", "jax_rocm", "libtpu", "jax-tpu")


def thp_mode(path: Path = THP_MODE_FILE) -> str | None:
    """The kernel's transparent-huge-page mode (`always`, `madvise`, `never`), None where it has none."""
    try:
        text = path.read_text()
    except OSError:
        return None
    return text[text.index("[") + 1:text.index("]")] if "[" in text and "]" in text else None


def glibc_version() -> tuple[int, int] | None:
    """(major, minor) of the C library when it is glibc, else None (musl, macOS, Windows)."""
    try:
        name, _, version = (os.confstr("CS_GNU_LIBC_VERSION") or "").partition(" ")
    except (AttributeError, ValueError, OSError):
        return None
    parts = version.split(".")
    return (int(parts[0]), int(parts[1])) if name == "glibc" and len(parts) >= 2 else None


def tunable_set(environ: Mapping[str, str]) -> bool:
    """Whether `GLIBC_TUNABLES` in `environ` already gives `glibc.malloc.hugetlb` a value (any value)."""
    return any(item.partition("=")[0] == TUNABLE for item in environ.get("GLIBC_TUNABLES", "").split(":"))


def would_help(environ: Mapping[str, str], mode: str | None, glibc: tuple[int, int] | None) -> bool:
    """The tunable is unset and would take effect: glibc 2.35+, THP in `madvise` mode (`always` gives huge
    pages without it, `never` none with it), and the user did not opt out."""
    return (environ.get(OPT_OUT, "1") != "0" and not tunable_set(environ) and mode == "madvise"
            and glibc is not None and glibc >= (2, 35))


def with_tunable(environ: Mapping[str, str]) -> dict[str, str]:
    """A copy of `environ` whose `GLIBC_TUNABLES` also sets `glibc.malloc.hugetlb=1`."""
    tunables = [item for item in environ.get("GLIBC_TUNABLES", "").split(":") if item]
    return {**environ, "GLIBC_TUNABLES": ":".join([*tunables, f"{TUNABLE}=1"])}


def jax_runs_on_cpu_only(environ: Mapping[str, str]) -> bool:
    """Whether JAX can only use the CPU here, decided without starting a backend: `JAX_PLATFORMS` names only
    `cpu`, or (unset) no accelerator plugin is installed."""
    platforms = {p.strip() for p in environ.get("JAX_PLATFORMS", "").split(",") if p.strip()}
    if platforms:
        return platforms == {"cpu"}
    names = (dist.metadata.get("Name", "") or "" for dist in importlib.metadata.distributions())
    return not any(name.lower().startswith(ACCELERATOR_PLUGINS) for name in names)


def relaunch_with_huge_pages() -> None:
    """Re-execute this process's command line with the tunable set, when it would help a CPU-only JAX.

    Call it before anything starts a JAX backend (an accelerator opened before `exec` would stay held).
    Returns only when nothing is to be done; otherwise the process image is replaced (same pid).
    """
    environ = dict(os.environ)
    if sys.platform != "linux" or not would_help(environ, thp_mode(), glibc_version()):
        return
    if not jax_runs_on_cpu_only(environ):
        return
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], with_tunable(environ))


def advise(platform: str) -> None:
    """Log, once per process, how to get huge pages when a trainer runs on the CPU without them."""
    global _advised
    if _advised or platform != "cpu" or not would_help(os.environ, thp_mode(), glibc_version()):
        return
    _advised = True
    logger.info("XLA:CPU maps its scratch memory afresh on every step, 4 KiB pages at a time; start Python "
                "with GLIBC_TUNABLES=%s=1 for transparent huge pages (1.10x faster steps on the benchmark "
                "Llama; the easytrain command sets it itself)", TUNABLE)


_advised = False
