"""Scanned decoder layers: compile times, step time and scratch memory against the unrolled loop.

    python -m benchmarks.scan [--quick] [--out FILE] [--depths 4,16,32]

At each depth a Llama (default: hidden 256, SwiGLU 768, vocab 8192, batch 4 x 128 tokens, float32) is built
once, with the same parameters and batch for both sides. A side's step is one jitted `value_and_grad` of
the mean next-token loss plus an AdamW update (parameters and optimizer state donated). Reported per depth
and side: seconds to lower and to compile that step (what the first step waits for), the compiled step's
temporary bytes (`memory_analysis()`), and seconds per step (median, min, max over `--repeats` windows of
`--steps`, the two sides alternating after warm-up); and the seconds to lower and compile the model's
initialisation (`nnx.state` of the freshly built model, the program a trainer compiles before its first step,
not run). The scan side builds and stores its layer weights stacked (`[L, ...]`, `easytrain.models.scan`), so
neither of its programs has per-layer arrays at all. No timing is asserted anywhere.
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
import optax
import transformers
from flax import nnx

from benchmarks.init_compile import compile_once
from benchmarks.report import emit, fill_defaults, relaunch_like_the_command
from easytrain.losses import token_cross_entropy_sums
from easytrain.models import init_model

PROFILES = {"full": dict(depths="4,16,32", hidden=256, length=128, batch=4, steps=3, repeats=3),
            "quick": dict(depths="2,4", hidden=64, length=32, batch=2, steps=2, repeats=2)}
SIDES = ("unrolled", "scan")


def seconds_of(fn: Any) -> tuple[Any, float]:
    started = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - started


def build_side(config: transformers.LlamaConfig, scan: bool, ids: jax.Array) -> dict[str, Any]:
    """The side's compiled train step, its first state, and the lower/compile seconds and temp bytes."""
    init = compile_once(config, "stacked" if scan else "draws")  # the initialisation program, as init_compile's
    model = init_model(config, seed=0, scan_layers=scan)
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    tx = optax.adamw(1e-3)

    def loss(params: nnx.State) -> jax.Array:
        logits = nnx.merge(graphdef, params, rest)(ids[:, :-1])
        total, count, _ = token_cross_entropy_sums(logits, ids[:, 1:], jnp.ones(ids[:, 1:].shape))
        return total / count

    def step(params: nnx.State, opt_state: Any) -> tuple[nnx.State, Any, jax.Array]:
        value, grads = jax.value_and_grad(loss)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, value

    opt_state = tx.init(params)
    lowered, lower_seconds = seconds_of(lambda: jax.jit(step, donate_argnums=(0, 1)).lower(params, opt_state))
    compiled, compile_seconds = seconds_of(lowered.compile)
    row = {"lower_seconds": round(lower_seconds, 3), "compile_seconds": round(compile_seconds, 3),
           "first_step_compile_seconds": round(lower_seconds + compile_seconds, 3),
           "init_compile_seconds": round(init["lower"] + init["compile"], 3),
           "temp": int(compiled.memory_analysis().temp_size_in_bytes)}
    return {"row": row, "step": compiled, "state": (params, opt_state)}


def timed(fn: Any, steps: int) -> float:
    started = time.perf_counter()
    for _ in range(steps):
        out = fn()
    jax.block_until_ready(out)
    return (time.perf_counter() - started) / steps


def run_depth(options: argparse.Namespace, depth: int) -> dict[str, Any]:
    config = transformers.LlamaConfig(vocab_size=8192, hidden_size=options.hidden, num_hidden_layers=depth,
                                      intermediate_size=3 * options.hidden,
                                      num_attention_heads=max(1, options.hidden // 64),
                                      num_key_value_heads=max(1, options.hidden // 128), max_position_embeddings=4096)
    ids = jnp.asarray(np.random.default_rng(0).integers(0, 8192, (options.batch, options.length + 1)))
    sides = {name: build_side(config, name == "scan", ids) for name in SIDES}

    def advance(side: dict[str, Any]) -> Any:
        params, opt_state, value = side["step"](*side["state"])
        side["state"] = (params, opt_state)
        return value

    seconds: dict[str, list[float]] = {name: [] for name in SIDES}
    for side in sides.values():
        jax.block_until_ready(advance(side))  # warm-up
    for repeat in range(options.repeats):
        for name in SIDES[repeat % 2:] + SIDES[:repeat % 2]:
            seconds[name].append(timed(lambda: advance(sides[name]), options.steps))
    rows = {name: {**sides[name]["row"], "step_seconds": {"median": round(statistics.median(seconds[name]), 4),
                                                          "min": round(min(seconds[name]), 4),
                                                          "max": round(max(seconds[name]), 4)}} for name in SIDES}
    scan, unrolled = rows["scan"], rows["unrolled"]
    return {**rows, "scan_over_unrolled": {
        "first_step_compile": round(scan["first_step_compile_seconds"] / unrolled["first_step_compile_seconds"], 3),
        "init_compile": round(scan["init_compile_seconds"] / unrolled["init_compile_seconds"], 3),
        "step_time": round(scan["step_seconds"]["median"] / unrolled["step_seconds"]["median"], 3),
        "temp": round(scan["temp"] / unrolled["temp"], 3)}}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="depths 2 and 4, 64 wide, 32 tokens")
    parser.add_argument("--depths", help="comma-separated layer counts (default: from the profile)")
    for name in ("hidden", "length", "batch", "steps", "repeats"):
        parser.add_argument(f"--{name}", type=int, help="(default: from the profile)")
    parser.add_argument("--out", help="also write the JSON result to this file")
    options = parser.parse_args(argv)
    fill_defaults(options, PROFILES["quick" if options.quick else "full"])
    depths = [int(d) for d in options.depths.split(",")]
    result = {"benchmark": "scan", "device": jax.devices()[0].device_kind, "cpu_count": os.cpu_count(),
              "config": {k: getattr(options, k) for k in ("hidden", "length", "batch")}, "depths": {}}
    for depth in depths:
        row = result["depths"][str(depth)] = run_depth(options, depth)
        for name in SIDES:
            side = row[name]
            print(f"depth {depth:3} {name:8} compile {side['first_step_compile_seconds']:7.2f} s  init compile "
                  f"{side['init_compile_seconds']:6.2f} s  temp "
                  f"{side['temp'] / 2**20:7.1f} MiB  s/step {side['step_seconds']['median']}", flush=True)
        print(f"depth {depth:3} scan/unrolled {row['scan_over_unrolled']}", flush=True)
    result["load_average_1m"] = round(os.getloadavg()[0], 2)
    return emit(result, options.out)


if __name__ == "__main__":
    relaunch_like_the_command()
    jax.config.update("jax_enable_compilation_cache", False)  # compile times are the point: never a cache hit
    main()
