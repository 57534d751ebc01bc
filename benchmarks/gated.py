"""What rematerialising the MLP's gated activation buys (`easytrain.models.gated`).

    python -m benchmarks.gated [--quick] [--rounds 24] [--steps 3] [--out FILE]

The `overhead` benchmark's model, blocks and AdamW. In one process: the trainer's compiled train step as it is
(the activation `silu(gate) * up` under `jax.checkpoint`, keeping only its two inputs for the backward pass) and
the same step with the activation differentiated as written (JAX's derivative keeps the sigmoid and the silu
too), alternated round by round on the same batch (the order reverses every round; the first round is
warm-up). Reports the median milliseconds per step of each, the paired median of the per-round speedups
(as written / rematerialised), the compiled kernels and scratch memory of each, and the first step's loss and
gradient norm of each (the same to rounding). Prints one JSON line.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from typing import Any
from unittest import mock

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import jax  # noqa: E402
import transformers  # noqa: E402

from benchmarks.overhead import CONFIG, QUICK, build_trainer, token_blocks  # noqa: E402
from benchmarks.report import emit, relaunch_like_the_command  # noqa: E402
from benchmarks.step_breakdown import variant_step  # noqa: E402
from easytrain.models import families, layers  # noqa: E402

MIB = 2**20
SIDES = ("rematerialised", "as_written")


def as_written(name: str):
    """The gated activation differentiated as written: what `easytrain.models.gated` replaced."""
    activation = families.ACTIVATIONS[name]
    return lambda gate, up: activation(gate) * up


def compiled_sides(trainer: Any, batch: Any) -> dict[str, Any]:
    """The trainer's train step compiled once with each form of the activation (traced under the patch)."""
    executables = {}
    for side in SIDES:
        form = as_written if side == "as_written" else layers.gated_activation
        with mock.patch.object(layers, "gated_activation", form):
            jax.clear_caches()  # else the second lowering reuses the first one's trace
            executables[side] = variant_step(trainer, "trainer").lower(trainer.state, batch).compile()
    return executables


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="tiny model, few rounds: a smoke run")
    parser.add_argument("--rounds", type=int, default=24)
    parser.add_argument("--steps", type=int, default=3, help="steps per side per round")
    parser.add_argument("--out")
    options = parser.parse_args(argv)
    config = transformers.LlamaConfig(**{**CONFIG, **(QUICK if options.quick else {})})
    rounds = 3 if options.quick else options.rounds
    trainer = build_trainer(config, token_blocks(config, options.quick), steps=1, every=1, callbacks=[])
    trainer.setup()
    batch = trainer.to_global(next(trainer.dataloaders.train.iterator(0)))
    executables = compiled_sides(trainer, batch)
    states = {side: jax.tree.map(lambda x: x.copy(), trainer.state) for side in SIDES}
    first = {}
    for side in SIDES:
        states[side], metrics = executables[side](states[side], batch)
        first[side] = {"loss": float(metrics["loss"].total / metrics["loss"].count),
                       "grad_norm": float(metrics["grad_norm"].total)}
    seconds: dict[str, list[float]] = {side: [] for side in SIDES}
    for round_index in range(rounds):
        for side in SIDES if round_index % 2 == 0 else SIDES[::-1]:
            started = time.perf_counter()
            for _ in range(options.steps):
                states[side], _ = executables[side](states[side], batch)
            jax.block_until_ready(states[side])
            seconds[side].append((time.perf_counter() - started) / options.steps)
    timed = {side: values[1:] for side, values in seconds.items()}  # the first round warms up
    speedups = [slow / fast for slow, fast in zip(timed["as_written"], timed["rematerialised"])]
    result = {
        "benchmark": "gated", "device": jax.devices()[0].device_kind, "rounds": rounds - 1, "steps": options.steps,
        "ms_per_step": {side: round(statistics.median(v) * 1e3, 2) for side, v in timed.items()},
        "speedup_paired_median": round(statistics.median(speedups), 4),
        "speedup_per_round": [round(s, 4) for s in speedups],
        "kernels": {side: executables[side].as_text().count("fusion(") for side in SIDES},
        "scratch_mib": {side: round(executables[side].memory_analysis().temp_size_in_bytes / MIB, 2)
                        for side in SIDES},
        "first_step": first,
        "load_average": list(os.getloadavg()),
    }
    return emit(result, options.out)


if __name__ == "__main__":
    relaunch_like_the_command()
    main()
