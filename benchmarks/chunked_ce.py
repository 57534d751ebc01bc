"""Chunked cross-entropy (`loss_chunk_size`): peak step memory and step time against the full logits, at a 128k
vocabulary, alternated in one process.

    python -m benchmarks.chunked_ce [--quick] [--out FILE]

One Llama config (default: vocabulary 131072 as Llama 3, 2 layers, hidden 512, SwiGLU 1536, untied head, batch
4 x 1024 tokens, float32), the same initial parameters and batch for every contender; each contender's
`value_and_grad` of `causal_lm_loss` over every parameter is jitted once: the full logits (`chunk 0`) and the
head applied `--chunks` tokens at a time. Reported per contender: the compiled step's temporary bytes and
peak estimate (`memory_analysis()`: argument + output + temp), the float32 `[tokens, vocab]` logits for scale,
the loss (equal across contenders up to float32 rounding), and seconds per step (median, min, max over
`--repeats` windows of `--steps`, the contenders rotating between windows). No timing is asserted anywhere.
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

from easytrain.losses import causal_lm_loss
from easytrain.models import init_model
from benchmarks.report import compiled_memory, emit, fill_defaults, relaunch_like_the_command

PROFILES = {"full": dict(vocab=131072, layers=2, hidden=512, length=1024, batch=4, steps=1, repeats=2),
            "quick": dict(vocab=4096, layers=1, hidden=64, length=64, batch=2, steps=1, repeats=1)}
CHUNKS = {"full": "256,1024", "quick": "16,48"}


def compiled_step(chunk_size: int, model: nnx.Module, batch: dict[str, jax.Array]) -> tuple[Any, Any, dict[str, int]]:
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    def loss(p):
        out = causal_lm_loss(nnx.merge(graphdef, p, rest), batch, None, True, chunk_size=chunk_size)
        return out.loss_sum / out.count

    step = jax.jit(jax.value_and_grad(loss))
    memory = compiled_memory(step.lower(params).compile())
    return step, params, memory


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="vocabulary 4096, 1 layer, 64 wide, 2 x 64 tokens")
    for name in PROFILES["full"]:
        parser.add_argument(f"--{name}", type=int, help="(default: from the profile)")
    parser.add_argument("--chunks", help="comma-separated tokens per chunk (default: from the profile)")
    parser.add_argument("--out", help="also write the JSON result to this file")
    options = parser.parse_args(argv)
    profile = "quick" if options.quick else "full"
    fill_defaults(options, PROFILES[profile])
    chunks = [0] + [int(c) for c in (options.chunks or CHUNKS[profile]).split(",")]
    config = transformers.LlamaConfig(vocab_size=options.vocab, hidden_size=options.hidden,
                                      num_hidden_layers=options.layers, intermediate_size=3 * options.hidden,
                                      num_attention_heads=max(1, options.hidden // 64),
                                      num_key_value_heads=max(1, options.hidden // 128),
                                      max_position_embeddings=max(4096, options.length), tie_word_embeddings=False)
    model = init_model(config, seed=0)
    ids = jnp.asarray(np.random.default_rng(0).integers(0, options.vocab, (options.batch, options.length + 1)))
    batch = {"input_ids": ids[:, :-1], "targets": ids[:, 1:], "loss_mask": jnp.ones(ids[:, 1:].shape, jnp.float32)}
    sides = {chunk: compiled_step(chunk, model, batch) for chunk in chunks}
    seconds: dict[int, list[float]] = {chunk: [] for chunk in chunks}
    losses = {}
    for chunk, (step, params, _) in sides.items():
        losses[chunk] = float(jax.block_until_ready(step(params))[0])  # warm-up
    for repeat in range(options.repeats):
        for chunk in chunks[repeat % len(chunks):] + chunks[:repeat % len(chunks)]:
            step, params, _ = sides[chunk]
            started = time.perf_counter()
            for _ in range(options.steps):
                out = step(params)
            jax.block_until_ready(out)
            seconds[chunk].append((time.perf_counter() - started) / options.steps)
    tokens = options.batch * options.length
    result = {"benchmark": "chunked_ce", "device": jax.devices()[0].device_kind, "cpu_count": os.cpu_count(),
              "config": {k: getattr(options, k) for k in ("vocab", "layers", "hidden", "length", "batch")},
              "logits_float32_bytes": tokens * options.vocab * 4,
              "chunks": {str(chunk): {**sides[chunk][2], "loss": round(losses[chunk], 6), "step_seconds": {
                  "median": round(statistics.median(seconds[chunk]), 4), "min": round(min(seconds[chunk]), 4),
                  "max": round(max(seconds[chunk]), 4)}} for chunk in chunks},
              "load_average_1m": round(os.getloadavg()[0], 2)}
    base = result["chunks"]["0"]
    for chunk, row in result["chunks"].items():
        row["temp_over_full"] = round(row["temp"] / base["temp"], 3)
        row["peak_over_full"] = round(row["peak_estimate"] / base["peak_estimate"], 3)
        row["time_over_full"] = round(row["step_seconds"]["median"] / base["step_seconds"]["median"], 3)
        print(f"chunk {chunk:>5} temp {row['temp'] / 2**20:9.1f} MiB ({row['temp_over_full']}x)  peak est "
              f"{row['peak_estimate'] / 2**20:9.1f} MiB  s/step {row['step_seconds']['median']} "
              f"({row['time_over_full']}x)  loss {row['loss']}")
    return emit(result, options.out)


if __name__ == "__main__":
    relaunch_like_the_command()
    main()
