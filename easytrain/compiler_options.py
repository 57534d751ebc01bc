"""XLA compiler options for the compiled steps: parsed from `compiler_options`, defaulted per backend,
checked before any training compute.

They go to `jax.jit(..., compiler_options=...)`, so they apply to easytrain's steps only: no process-wide
`XLA_FLAGS`, nothing changed for the user's other programs.
"""

from __future__ import annotations

import functools
import logging
from typing import Mapping

import jax
import numpy as np

from easytrain.errors import ArgumentError

logger = logging.getLogger("easytrain")
Options = dict[str, "str | bool | int"]

#: easytrain's measured XLA:CPU defaults per CPU vendor (`compiler_options='auto'`), XLA's own elsewhere. With
#: XLA's YNNPACK library fusions (matmuls handed to YNNPACK) off, the benchmark Llama's train step ran 1.02-1.16x
#: faster on AMD EPYC (Zen 3, 4 and 5) but 1.036x slower on an Intel Xeon (AVX-512, AMX), where XLA's defaults
#: stay (docs/benchmarks.md, "XLA CPU flags"). A vendor not measured keeps XLA's defaults too.
CPU_VENDOR_DEFAULTS: dict[str, Options] = {"AuthenticAMD": {"xla_cpu_experimental_ynn_fusion_type": ""}}
AUTO = "auto"


def parse(text: str) -> Options:
    """`'name=value,name=value'` -> options; `true`/`false` become booleans and integers ints, as XLA expects.

    Raises `ArgumentError` (field `compiler_options`) for a malformed pair.
    """
    options: Options = {}
    for pair in filter(None, (part.strip() for part in text.split(","))):
        name, equals, value = pair.partition("=")
        name, value = name.strip(), value.strip()
        if not equals or not name.startswith("xla_"):
            raise ArgumentError("compiler_options", f"{pair!r} is not 'xla_<option>=<value>'; write options as "
                                "'name=value' pairs separated by commas, 'auto' for easytrain's defaults, or '' "
                                "for XLA's own.")
        options[name] = _typed(value)
    return options


def _typed(value: str) -> str | bool | int:
    if value.lower() in ("true", "false"):
        return value.lower() == "true"
    try:
        return int(value)
    except ValueError:
        return value


def for_platform(setting: str, platform: str) -> Options:
    """The options a run compiles its steps with: the platform's defaults under `'auto'` (those this
    XLA knows), else exactly the parsed `setting`, each checked by compiling a trivial program."""
    if setting.strip() != AUTO:
        options = parse(setting)
        if problem := rejection(options):
            raise ArgumentError("compiler_options", f"XLA ({platform}) refused {options}: {problem}. Check each "
                                "option's name and value for this jax version, or use 'auto'.")
        return options
    defaults = dict(backend_defaults(platform))
    for name in list(defaults):
        if problem := rejection({name: defaults[name]}):  # a newer XLA dropped an experimental option
            logger.debug("compiler option %s not used: %s", name, problem)
            del defaults[name]
    return defaults


def backend_defaults(platform: str) -> Options:
    """easytrain's measured options for `platform` under `'auto'`, before checking that this XLA knows them."""
    return CPU_VENDOR_DEFAULTS.get(cpu_vendor() or "", {}) if platform == "cpu" else {}


def cpu_vendor() -> str | None:
    """This machine's CPU vendor (`GenuineIntel`, `AuthenticAMD`, ...), or None where Linux's cpuinfo is absent."""
    return read_cpu_vendor("/proc/cpuinfo")


@functools.lru_cache(maxsize=None)
def read_cpu_vendor(path: str) -> str | None:
    try:
        with open(path) as cpuinfo:
            for line in cpuinfo:
                name, _, value = line.partition(":")
                if name.strip() == "vendor_id":
                    return value.strip()
    except OSError:
        pass
    return None


def rejection(options: Mapping[str, str | bool | int]) -> str | None:
    """Why XLA refuses these options (its message), or None; one tiny compile per distinct set per process
    (every trainer built checks its options)."""
    return _rejection(tuple(sorted(options.items()))) if options else None


@functools.lru_cache(maxsize=None)
def _rejection(items: tuple[tuple[str, str | bool | int], ...]) -> str | None:
    try:
        jax.jit(lambda x: x + 1, compiler_options=dict(items)).lower(np.float32(0)).compile()
    except Exception as error:  # XLA raises JaxRuntimeError (INVALID_ARGUMENT) for unknown names or values
        return str(error).splitlines()[0]
    return None
