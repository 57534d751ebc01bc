"""What computing the weight gradients from `x^T` written out buys on XLA:CPU (`easytrain.models.dense_product`).

    python -m benchmarks.weight_gradients [--quick] [--rounds 24] [--steps 3] [--out FILE]

First the product alone, for each weight shape of the benchmark Llama (`x` `[2048, I]`, `g` `[2048, O]`): the
median milliseconds of `x^T @ g` as JAX's transpose rule writes it and with `x^T` written out first (behind an
`optimization_barrier`), alternated, with the paired median of their ratios, compiled as the trainer compiles
its steps. Then the whole step, in one process (`benchmarks.step_forms`): the trainer's compiled train step as it
is (every dense layer through `dense_product`) and the same step with plain `jnp.dot` products, alternated round
by round on the same batch. Reports the median milliseconds per step of each, the paired median of the per-round
speedups (plain / transposed), the compiled kernels and scratch memory of each, and the first step's loss and
gradient norm of each. Prints one JSON line.
"""

from __future__ import annotations

import os
import statistics
import time
from unittest import mock

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from benchmarks.report import relaunch_like_the_command  # noqa: E402
from benchmarks.step_forms import compare, parse_options, unchanged  # noqa: E402
from easytrain import compiler_options  # noqa: E402
from easytrain.models import layers  # noqa: E402

#: (tokens, in, out) of the benchmark Llama's weight gradients: attention projections, gate/up, down, output head.
SHAPES = ((2048, 256, 256), (2048, 256, 1024), (2048, 1024, 256), (2048, 256, 4096))
QUICK_SHAPES = ((64, 32, 64), (64, 64, 32))


def plain_product(x_MI: jax.Array, w_IO: jax.Array, out_dtype=None) -> jax.Array:
    """The dense layers' product as it was: `jnp.dot`, differentiated by JAX's own rule."""
    return jnp.dot(x_MI, w_IO, preferred_element_type=out_dtype)


def product_ms(shapes: tuple[tuple[int, int, int], ...], rounds: int, calls: int) -> list[dict]:
    """Per shape: median milliseconds of `x^T @ g` in each form, alternated round by round (`calls` each)."""
    options = compiler_options.for_platform(compiler_options.AUTO, jax.default_backend())
    forms = {"plain": lambda x, g: x.T @ g, "transposed": lambda x, g: jax.lax.optimization_barrier(x.T) @ g}
    rng = np.random.default_rng(0)
    results = []
    for tokens, inputs, outputs in shapes:
        x = jnp.asarray(rng.standard_normal((tokens, inputs)), jnp.float32)
        g = jnp.asarray(rng.standard_normal((tokens, outputs)), jnp.float32)
        jitted = {name: jax.jit(form, compiler_options=options) for name, form in forms.items()}
        seconds: dict[str, list[float]] = {name: [] for name in forms}
        for round_index in range(rounds + 1):  # the first round warms up
            for name in forms if round_index % 2 == 0 else reversed(forms):
                started = time.perf_counter()
                for _ in range(calls):
                    out = jitted[name](x, g)
                jax.block_until_ready(out)
                seconds[name].append((time.perf_counter() - started) / calls)
        ratios = [p / t for p, t in zip(seconds["plain"][1:], seconds["transposed"][1:])]
        results.append({"shape": [tokens, inputs, outputs],
                        **{name: round(statistics.median(v[1:]) * 1e3, 3) for name, v in seconds.items()},
                        "plain_over_transposed": round(statistics.median(ratios), 4)})
    return results


def main(argv: list[str] | None = None) -> dict:
    options = parse_options(__doc__, argv)
    products = product_ms(QUICK_SHAPES if options.quick else SHAPES, rounds=2 if options.quick else 15,
                          calls=2 if options.quick else 10)
    forms = {"transposed": unchanged, "plain": lambda: mock.patch.object(layers, "dense_product", plain_product)}
    return compare("weight_gradients", forms, options, extra={"products_ms": products})


if __name__ == "__main__":
    relaunch_like_the_command()
    main()
