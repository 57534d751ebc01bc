"""Two forms of the trainer's train step in one process: what one change to the model's math buys.

The driver behind `gated.py` and `maxima.py`. The `overhead` benchmark's model, blocks and AdamW; the trainer's
compiled train step traced once under each form's patch (the change as it is, and the code it replaced),
alternated round by round on the same batch (the order reverses every round; the first round is warm-up).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import time
from typing import Any, Callable, ContextManager

import jax
import transformers

from benchmarks.overhead import CONFIG, QUICK, build_trainer, token_blocks
from benchmarks.report import emit
from benchmarks.step_breakdown import variant_step

MIB = 2**20
#: Form name -> the patch under which the trainer's step is traced in that form.
Forms = dict[str, Callable[[], ContextManager]]


def unchanged() -> ContextManager:
    """The patch of the form that is the code as it is."""
    return contextlib.nullcontext()


def parse_options(description: str, argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--quick", action="store_true", help="tiny model, few rounds: a smoke run")
    parser.add_argument("--rounds", type=int, default=24)
    parser.add_argument("--steps", type=int, default=3, help="steps per form per round")
    parser.add_argument("--out")
    return parser.parse_args(argv)


def compiled_forms(trainer: Any, batch: Any, forms: Forms) -> dict[str, Any]:
    """The trainer's train step compiled once per form, traced under its patch."""
    executables = {}
    for name, patch in forms.items():
        with patch():
            jax.clear_caches()  # else a later lowering reuses an earlier one's trace
            executables[name] = variant_step(trainer, "trainer").lower(trainer.state, batch).compile()
    return executables


def compare(benchmark: str, forms: Forms, options: argparse.Namespace, extra: dict | None = None) -> dict:
    """Time `forms` (two: the change first, the code it replaced second) and emit one JSON line: the median
    milliseconds per step of each, the paired median of the per-round speedups (second / first), each form's
    compiled kernels and scratch memory, each one's first-step loss and gradient norm, and `extra`."""
    new, old = forms
    config = transformers.LlamaConfig(**{**CONFIG, **(QUICK if options.quick else {})})
    rounds = 3 if options.quick else options.rounds
    trainer = build_trainer(config, token_blocks(config, options.quick), steps=1, every=1, callbacks=[])
    trainer.setup()
    batch = trainer.to_global(next(trainer.dataloaders.train.iterator(0)))
    executables = compiled_forms(trainer, batch, forms)
    states = {name: jax.tree.map(lambda x: x.copy(), trainer.state) for name in forms}
    first = {}
    for name in forms:
        states[name], metrics = executables[name](states[name], batch)
        first[name] = {"loss": float(metrics["loss"].total / metrics["loss"].count),
                       "grad_norm": float(metrics["grad_norm"].total)}
    seconds: dict[str, list[float]] = {name: [] for name in forms}
    for round_index in range(rounds):
        for name in (new, old) if round_index % 2 == 0 else (old, new):
            started = time.perf_counter()
            for _ in range(options.steps):
                states[name], _ = executables[name](states[name], batch)
            jax.block_until_ready(states[name])
            seconds[name].append((time.perf_counter() - started) / options.steps)
    timed = {name: values[1:] for name, values in seconds.items()}  # the first round warms up
    speedups = [slow / fast for slow, fast in zip(timed[old], timed[new])]
    result = {
        "benchmark": benchmark, "device": jax.devices()[0].device_kind, "rounds": rounds - 1, "steps": options.steps,
        "ms_per_step": {name: round(statistics.median(v) * 1e3, 2) for name, v in timed.items()},
        "speedup_paired_median": round(statistics.median(speedups), 4),
        "speedup_per_round": [round(s, 4) for s in speedups],
        "kernels": {name: executables[name].as_text().count("fusion(") for name in forms},
        "scratch_mib": {name: round(executables[name].memory_analysis().temp_size_in_bytes / MIB, 2)
                        for name in forms},
        "first_step": first,
        **(extra or {}),
        "load_average": list(os.getloadavg()),
    }
    return emit(result, options.out)
