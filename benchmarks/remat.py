"""Rematerialisation: peak step memory against step time for each `remat_policy`, alternated in one process.

    python -m benchmarks.remat [--quick] [--out FILE]

One Llama config (default: 8 layers, hidden 512, SwiGLU 1536, vocab 8192, batch 8 x 512 tokens, float32),
the same initial parameters and batch for every policy; each policy's `value_and_grad` of the mean
next-token loss is jitted once. Reported per policy: the compiled step's temporary bytes and peak
estimate (`memory_analysis()`: argument + output + temp), and seconds per step (median, min, max over
`--repeats` windows of `--steps`, the policies rotating between windows). No timing is asserted anywhere.
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

from easytrain.losses import token_cross_entropy_sums
from easytrain.models import init_model
from easytrain.models.remat import POLICIES
from benchmarks.report import compiled_memory, emit, fill_defaults, relaunch_like_the_command

PROFILES = {"full": dict(layers=8, hidden=512, length=512, batch=8, steps=2, repeats=4),
            "quick": dict(layers=2, hidden=64, length=64, batch=4, steps=2, repeats=2)}


def compiled_step(policy: str, config: transformers.LlamaConfig, ids: jax.Array) -> tuple[Any, Any, dict[str, int]]:
    model = init_model(config, seed=0)
    model.remat = policy
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    def loss(p):
        logits = nnx.merge(graphdef, p, rest)(ids[:, :-1])
        total, count, _ = token_cross_entropy_sums(logits, ids[:, 1:], jnp.ones(ids[:, 1:].shape))
        return total / count

    step = jax.jit(jax.value_and_grad(loss))
    memory = compiled_memory(step.lower(params).compile())
    return step, params, memory


def policy_rows(memory: dict[str, dict[str, int]], seconds: dict[str, list[float]]) -> dict[str, dict[str, Any]]:
    """Per policy: its compiled memory, seconds per step (median, min, max; rounded) and both over the `none`
    policy's, the time ratio from the unrounded medians (a 0.3 ms step rounded to 4 decimals is 7% off)."""
    median = {policy: statistics.median(values) for policy, values in seconds.items()}
    return {policy: {**memory[policy], "step_seconds": {"median": round(median[policy], 4),
                                                        "min": round(min(seconds[policy]), 4),
                                                        "max": round(max(seconds[policy]), 4)},
        "temp_over_none": round(memory[policy]["temp"] / memory["none"]["temp"], 3),
        "time_over_none": round(median[policy] / median["none"], 3)} for policy in memory}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="2 layers, 64 wide, 64 tokens")
    for name in PROFILES["full"]:
        parser.add_argument(f"--{name}", type=int, help="(default: from the profile)")
    parser.add_argument("--out", help="also write the JSON result to this file")
    options = parser.parse_args(argv)
    fill_defaults(options, PROFILES["quick" if options.quick else "full"])
    config = transformers.LlamaConfig(vocab_size=8192, hidden_size=options.hidden, num_hidden_layers=options.layers,
                                      intermediate_size=3 * options.hidden,
                                      num_attention_heads=max(1, options.hidden // 64),
                                      num_key_value_heads=max(1, options.hidden // 128), max_position_embeddings=4096)
    ids = jnp.asarray(np.random.default_rng(0).integers(0, 8192, (options.batch, options.length + 1)))
    sides = {policy: compiled_step(policy, config, ids) for policy in POLICIES}
    seconds: dict[str, list[float]] = {policy: [] for policy in POLICIES}
    for step, params, _ in sides.values():
        jax.block_until_ready(step(params))  # warm-up
    order = list(POLICIES)
    for repeat in range(options.repeats):
        for policy in order[repeat % len(order):] + order[:repeat % len(order)]:
            step, params, _ = sides[policy]
            started = time.perf_counter()
            for _ in range(options.steps):
                out = step(params)
            jax.block_until_ready(out)
            seconds[policy].append((time.perf_counter() - started) / options.steps)
    result = {"benchmark": "remat", "device": jax.devices()[0].device_kind, "cpu_count": os.cpu_count(),
              "config": {k: getattr(options, k) for k in ("layers", "hidden", "length", "batch")},
              "policies": policy_rows({policy: side[2] for policy, side in sides.items()}, seconds),
              "load_average_1m": round(os.getloadavg()[0], 2)}
    for policy, row in result["policies"].items():
        print(f"{policy:5} temp {row['temp'] / 2**20:8.1f} MiB ({row['temp_over_none']}x)  peak est "
              f"{row['peak_estimate'] / 2**20:8.1f} MiB  "
              f"s/step {row['step_seconds']['median']} ({row['time_over_none']}x)")
    return emit(result, options.out)


if __name__ == "__main__":
    relaunch_like_the_command()
    main()
