"""What the compare-and-select row maxima buy on XLA:CPU (`easytrain.models.maxima`).

    python -m benchmarks.maxima [--quick] [--rounds 24] [--steps 3] [--out FILE]

First the reduction alone: the median milliseconds of `jnp.max` and of `shift_max` over a float32 `[2048, 4096]`
array (the benchmark Llama's logits), with a sum over the same array for scale, compiled as the trainer compiles
its steps. Then the whole step, in one process (`benchmarks.step_forms`): the trainer's compiled train step as it
is (the shifts of the attention's softmax and of the cross-entropy by `shift_max`) and the same step with
`jnp.max` as the shift, alternated round by round on the same batch. Reports the median milliseconds per step of
each, the paired median of the per-round speedups (`jnp.max` / `shift_max`), the compiled kernels and scratch
memory of each, and the first step's loss and gradient norm of each (the same to the bit). Prints one JSON line.
"""

from __future__ import annotations

import contextlib
import os
import statistics
import time
from typing import Any, Callable
from unittest import mock

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from benchmarks.report import relaunch_like_the_command  # noqa: E402
from benchmarks.step_forms import compare, parse_options, unchanged  # noqa: E402
from easytrain import chunked_loss, compiler_options, sequence_logps  # noqa: E402
from easytrain.models import maxima  # noqa: E402


def plain_max(x: jax.Array, axis: int = -1, keepdims: bool = False) -> jax.Array:
    """The shift as it was: `jnp.max`, whose NaN-propagating form XLA:CPU does not vectorise."""
    return jnp.max(jax.lax.stop_gradient(x), axis=axis, keepdims=keepdims)


@contextlib.contextmanager
def with_plain_max():
    """Every user of `shift_max` shifting by `plain_max` instead."""
    with contextlib.ExitStack() as stack:
        for module in (maxima, chunked_loss, sequence_logps):
            stack.enter_context(mock.patch.object(module, "shift_max", plain_max))
        yield


def reduction_ms(rows: int, columns: int, repeats: int) -> dict[str, float]:
    """Median milliseconds of each row reduction over one float32 `[rows, columns]` array, compiled with XLA:CPU's
    own reduction code, not YNNPACK's (the options `compiler_options='auto'` gives on AMD CPUs, on every CPU here)."""
    x = jnp.asarray(np.random.default_rng(0).standard_normal((rows, columns)), jnp.float32)
    reductions: dict[str, Callable[[Any], Any]] = {"jnp_max": lambda a: jnp.max(a, -1), "shift_max": maxima.shift_max,
                                                   "sum": lambda a: jnp.sum(a, -1)}
    options = compiler_options.CPU_VENDOR_DEFAULTS["AuthenticAMD"] if jax.default_backend() == "cpu" else {}
    result = {}
    for name, reduce in reductions.items():
        jitted = jax.jit(reduce, compiler_options=options)
        jax.block_until_ready(jitted(x))
        seconds = []
        for _ in range(repeats):
            started = time.perf_counter()
            jax.block_until_ready(jitted(x))
            seconds.append(time.perf_counter() - started)
        result[name] = round(statistics.median(seconds) * 1e3, 3)
    return result


def main(argv: list[str] | None = None) -> dict:
    options = parse_options(__doc__, argv)
    rows, columns = (64, 256) if options.quick else (2048, 4096)
    reduction = reduction_ms(rows, columns, repeats=5 if options.quick else 50)
    forms = {"shift_max": unchanged, "jnp_max": with_plain_max}
    return compare("maxima", forms, options, extra={"reduction_ms": {"shape": [rows, columns], **reduction}})


if __name__ == "__main__":
    relaunch_like_the_command()
    main()
