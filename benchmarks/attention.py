"""Attention implementations: step time and compiled scratch memory of "xla", "dot_product_attention", "splash".

    python -m benchmarks.attention [--quick] [--lengths 512,1024,2048] [--implementations a,b] [--out FILE]

One Llama config (default: 2 layers, hidden 512, 8 query heads over 4 key/value heads, SwiGLU 1536,
vocab 8192, float32), batch 2 right-padded rows (the second 3/4 real, so padding goes through the
key-lengths branch), at each sequence length. Per implementation and length: `value_and_grad` of the
mean next-token loss, jitted once; the compiled step's temporary bytes (`memory_analysis()`); seconds
per step (median, min, max over `--repeats` windows of `--steps`, the two implementations alternating).
Which kernel `jax.nn.dot_product_attention` runs is reported (`kernel`: cuDNN only on CUDA GPUs in 16-bit).
"splash" is jax's Pallas TPU kernel: off TPU it runs in Pallas's interpreter (`splash_interpreted`), so its
time there says nothing about TPU speed, and its scratch memory is the interpreter's block-by-block program
(no ``[T, S]`` scores). No timing is asserted anywhere.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import transformers
from flax import nnx

from benchmarks.report import emit, fill_defaults, relaunch_like_the_command
from easytrain.losses import token_cross_entropy_sums
from easytrain.models import init_model
from easytrain.models.masks import IMPLEMENTATIONS, kernel_for

PROFILES = {"full": dict(layers=2, hidden=512, batch=2, steps=1, repeats=3, lengths="512,1024,2048"),
            "quick": dict(layers=1, hidden=64, batch=2, steps=1, repeats=2, lengths="32,64")}
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def compiled_step(implementation: str, config: transformers.LlamaConfig, dtype: Any, ids_BL: jax.Array,
                  mask_BL: jax.Array) -> tuple[Any, Any, int]:
    model = init_model(config, seed=0, dtype=dtype)
    model.attention_implementation = implementation
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    def loss(p):
        logits = nnx.merge(graphdef, p, rest)(ids_BL[:, :-1], attention_mask_BT=mask_BL[:, :-1])
        total, count, _ = token_cross_entropy_sums(logits, ids_BL[:, 1:], mask_BL[:, 1:])
        return total / count

    step = jax.jit(jax.value_and_grad(loss))
    temp = step.lower(params).compile().memory_analysis().temp_size_in_bytes
    return step, params, int(temp)


def measure(config: transformers.LlamaConfig, options: argparse.Namespace, length: int) -> dict[str, Any]:
    rng = np.random.default_rng(length)
    ids_BL = jnp.asarray(rng.integers(0, config.vocab_size, (options.batch, length + 1)))
    real_B = np.full(options.batch, length + 1)
    real_B[1:] = 3 * (length + 1) // 4
    mask_BL = jnp.asarray(np.arange(length + 1)[None, :] < real_B[:, None], jnp.int32)
    dtype = DTYPES[options.dtype]
    order = options.implementations.split(",")
    sides = {name: compiled_step(name, config, dtype, ids_BL, mask_BL) for name in order}
    for step, params, _ in sides.values():
        jax.block_until_ready(step(params))  # warm-up
    seconds: dict[str, list[float]] = {name: [] for name in order}
    for repeat in range(options.repeats):
        for name in order[repeat % len(order):] + order[:repeat % len(order)]:
            step, params, _ = sides[name]
            started = time.perf_counter()
            for _ in range(options.steps):
                out = step(params)
            jax.block_until_ready(out)
            seconds[name].append((time.perf_counter() - started) / options.steps)
    rows = {name: {"temp": sides[name][2], "step_seconds": {
        "median": round(statistics.median(seconds[name]), 4), "min": round(min(seconds[name]), 4),
        "max": round(max(seconds[name]), 4)}} for name in order}
    plain = rows["xla"]
    over_xla = {name: {"temp": round(side["temp"] / plain["temp"], 3),
                       "time": round(side["step_seconds"]["median"] / plain["step_seconds"]["median"], 3)}
                for name, side in rows.items() if name != "xla"}
    return {"length": length, "implementations": rows, "over_xla": over_xla}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="1 layer, 64 wide, lengths 32 and 64")
    for name in ("layers", "hidden", "batch", "steps", "repeats"):
        parser.add_argument(f"--{name}", type=int, help="(default: from the profile)")
    parser.add_argument("--lengths", help="comma-separated sequence lengths (default: from the profile)")
    parser.add_argument("--dtype", choices=tuple(DTYPES), default="float32")
    parser.add_argument("--implementations", default=",".join(IMPLEMENTATIONS),
                        help="comma-separated, xla first (default: every one)")
    parser.add_argument("--out", help="also write the JSON result to this file")
    options = parser.parse_args(argv)
    fill_defaults(options, PROFILES["quick" if options.quick else "full"])
    if options.implementations.split(",")[0] != "xla" or set(options.implementations.split(",")) - set(IMPLEMENTATIONS):
        parser.error(f"--implementations: 'xla' first, then any of {', '.join(IMPLEMENTATIONS[1:])}")
    lengths = [int(n) for n in options.lengths.split(",")]
    heads = max(1, options.hidden // 64)
    config = transformers.LlamaConfig(vocab_size=8192, hidden_size=options.hidden, num_hidden_layers=options.layers,
                                      intermediate_size=3 * options.hidden, num_attention_heads=heads,
                                      num_key_value_heads=max(1, heads // 2), max_position_embeddings=max(lengths))
    result = {"benchmark": "attention", "device": jax.devices()[0].device_kind, "cpu_count": os.cpu_count(),
              "kernel": kernel_for(DTYPES[options.dtype]) or "xla",
              "splash_interpreted": jax.default_backend() != "tpu",
              "config": {k: getattr(options, k) for k in ("layers", "hidden", "batch", "dtype")},
              "lengths": [measure(config, options, length) for length in lengths],
              "load_average_1m": round(os.getloadavg()[0], 2)}
    for row in result["lengths"]:
        for name, side in row["implementations"].items():
            print(f"T={row['length']:5} {name:21} temp {side['temp'] / 2**20:8.1f} MiB  "
                  f"s/step {side['step_seconds']['median']}")
        for name, ratio in row["over_xla"].items():
            print(f"T={row['length']:5} {name} / xla: temp {ratio['temp']}x, time {ratio['time']}x")
    return emit(result, options.out)


if __name__ == "__main__":
    relaunch_like_the_command()
    main()
