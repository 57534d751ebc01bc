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

#: easytrain's measured defaults per platform (`compiler_options='auto'`). On XLA:CPU the YNNPACK library
#: fusions (matmuls and reductions handed to YNNPACK) made the benchmark Llama's train step 1.06-1.16x
#: slower and its compile slower than XLA's own emitters (docs/benchmarks.md, "XLA CPU flags").
BACKEND_DEFAULTS: dict[str, Options] = {"cpu": {"xla_cpu_experimental_ynn_fusion_type": ""}}
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
    defaults = dict(BACKEND_DEFAULTS.get(platform, {}))
    for name in list(defaults):
        if problem := rejection({name: defaults[name]}):  # a newer XLA dropped an experimental option
            logger.debug("compiler option %s not used: %s", name, problem)
            del defaults[name]
    return defaults


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
