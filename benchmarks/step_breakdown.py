"""What the trainer's train step costs beyond the hand-written one, part by part.

    python -m benchmarks.step_breakdown [--quick] [--rounds 20] [--steps 3] [--compiles 3] [--cold 0] [--out FILE]

The `overhead` benchmark's model, blocks and AdamW. In one process: the trainer's compiled train step
(`compile_step` of `easytrain.steps.train_step`, as `configure_functions` builds it) and variants of it
without one of its extras each (the gradient norm, the token-accuracy metric, the non-finite guard's
`lax.cond`) and without all three, alternated round by round with `overhead.py`'s hand-written step on the
same batch (the order reverses every round; the first round is warm-up). Compile time: every variant and
the hand-written step lowered and compiled `--compiles` times, round-robin, caches cleared, after one untimed
compile, so none pays the process's first-compile warm-up (the in-process counterpart of `overhead`'s
cold-process compile ratio, with less of the machine's noise). Reports the median milliseconds per step and
compile seconds of each, what each extra costs (the median over rounds of the whole step's time minus the
variant's in the same round, and the range of those differences), all three together, and what is left
between the step without them and the hand-written one. With `--cold N`, each variant and the hand-written
step are also compiled alone, as their process's first compile, in N fresh child processes each (round-robin,
the order reversing every repeat): lowering and XLA's compile timed apart, by the wall clock and by the
process's CPU time (XLA:CPU compiles on several threads), which is what a user's first step pays and what
`overhead`'s cold compile ratio measures. Prints one JSON line.
"""

from __future__ import annotations

import argparse
import functools
import gc
import json
import os
import statistics
import time
from typing import Any, Callable
from unittest import mock

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import transformers  # noqa: E402

from benchmarks.overhead import (BATCH, CONFIG, LENGTH, QUICK, build_trainer, hand_written_loop,  # noqa: E402
                                 token_blocks)
from benchmarks.report import child_json, emit, relaunch_like_the_command  # noqa: E402
from easytrain import BaseTrainer, steps  # noqa: E402

#: Each extra of the trainer's step, and the variant of the step without it.
PARTS = {"grad_norm": "no_grad_norm", "accuracy": "no_accuracy", "guard": "no_guard"}
#: Variant name -> the parts it leaves out; `no_extras` leaves out all three, to show whether anything else
#: separates the trainer's step from the hand-written one.
VARIANTS = {"trainer": (), **{variant: (part,) for part, variant in PARTS.items()}, "no_extras": tuple(PARTS)}


def variant_step(trainer: BaseTrainer, variant: str) -> Callable[..., Any]:
    """The trainer's jitted train step without the parts `VARIANTS[variant]` names, with the trainer's
    shardings and XLA options."""
    without = VARIANTS[variant]
    loss_fn = trainer.compute_loss
    if "accuracy" in without:
        def loss_fn(model, batch, rng, train, frozen=None):
            out = trainer.compute_loss(model, batch, rng, train, frozen)
            return out._replace(metrics={k: v for k, v in out.metrics.items() if k != "accuracy"})
    step = functools.partial(steps.train_step, loss_fn=loss_fn, schedule=trainer.scheduler,
                             skip_non_finite="guard" not in without)
    if "grad_norm" in without:
        def step(state, batch, _step=step):  # a zero norm, at trace time only
            with mock.patch.object(steps, "global_norm", lambda tree: jnp.zeros((), jnp.float32)):
                return _step(state, batch)
    return trainer.compile_step(step, donate_state=True, returns_state=True)


def compile_round_robin(lowerings: dict[str, Callable[[], Any]],
                        compiles: int) -> tuple[dict[str, float], dict[str, Any]]:
    """Median seconds of `compiles` timed lowerings + compiles of each, round-robin, and each one's last
    executable. Python's garbage collector is off while each is timed: in a process holding half a million
    objects (a trainer, its data, its libraries), a full collection takes about 0.3 s and fell inside one
    variant's lowering or another's as tracing filled the young generations, noise larger than the extras
    compared. A fresh process's first compile, which `--cold` times, ran into none (3 processes a side)."""
    seconds: dict[str, list[float]] = {name: [] for name in lowerings}
    executables: dict[str, Any] = {}
    for _ in range(compiles):
        for name, lower in lowerings.items():
            jax.clear_caches()  # else `compile` returns the executable it built before
            gc.collect()
            gc.disable()
            try:
                started = time.perf_counter()
                executables[name] = lower().compile()
                seconds[name].append(time.perf_counter() - started)
            finally:
                gc.enable()
    return {name: round(statistics.median(s), 3) for name, s in seconds.items()}, executables


def compile_alone(side: str, quick: bool) -> dict[str, float]:
    """This process's first compile of one side (a variant of the trainer's step, or `hand_written`): seconds of
    lowering and of XLA's compile, by the wall clock and by the process's CPU time."""
    config = transformers.LlamaConfig(**{**CONFIG, **(QUICK if quick else {})})
    blocks = token_blocks(config, quick)
    if side == "hand_written":
        lower = hand_written_loop(config, blocks, seed=0, compile_now=False)[0].lower
    else:
        trainer = build_trainer(config, blocks, steps=1, every=1, callbacks=[])
        trainer.setup()
        batch = trainer.to_global(next(trainer.dataloaders.train.iterator(0)))
        lower = functools.partial(variant_step(trainer, side).lower, trainer.state, batch)
    wall, cpu = time.perf_counter(), time.process_time()
    lowered = lower()
    lower_wall, lower_cpu = time.perf_counter() - wall, time.process_time() - cpu
    wall, cpu = time.perf_counter(), time.process_time()
    lowered.compile()
    return {"side": side, "lower_seconds": lower_wall, "lower_cpu_seconds": lower_cpu,
            "compile_seconds": time.perf_counter() - wall, "compile_cpu_seconds": time.process_time() - cpu}


def cold_compiles(repeats: int, quick: bool) -> dict[str, Any]:
    """Every side compiled alone in `repeats` fresh child processes (`compile_alone`), round-robin, the order
    reversing every repeat; medians per side, what each part adds, and the trainer / hand-written ratios."""
    sides = (*VARIANTS, "hand_written")
    rows: dict[str, list[dict]] = {side: [] for side in sides}
    for repeat in range(repeats):
        for side in sides if repeat % 2 == 0 else sides[::-1]:
            rows[side].append(child_json("benchmarks.step_breakdown", "--compile_alone", side,
                                         *(["--quick"] if quick else [])))

    def median(side: str, *keys: str) -> float:
        return statistics.median(sum(row[key] for key in keys) for row in rows[side])

    total = ("lower_seconds", "compile_seconds")
    return {
        "cold_repeats": repeats,
        "cold_lower_seconds": {side: round(median(side, "lower_seconds"), 3) for side in sides},
        "cold_compile_seconds": {side: round(median(side, "compile_seconds"), 3) for side in sides},
        "cold_compile_seconds_all": {side: [round(row["compile_seconds"], 3) for row in rows[side]] for side in sides},
        "cold_compile_cpu_seconds": {side: round(median(side, "compile_cpu_seconds"), 3) for side in sides},
        "cold_part_compile_seconds": {part: round(median("trainer", "compile_seconds")
                                                  - median(variant, "compile_seconds"), 3)
                                      for part, variant in {**PARTS, "extras": "no_extras"}.items()},
        # Lowering + compile, as `overhead` times each side's first step.
        "cold_ratio_compile_trainer_over_hand_written": round(median("trainer", *total)
                                                              / median("hand_written", *total), 4),
        "cold_ratio_compile_cpu_trainer_over_hand_written": round(
            median("trainer", "compile_cpu_seconds") / median("hand_written", "compile_cpu_seconds"), 4),
    }


def paired(seconds: dict[str, list[float]], variant: str, minus: str = "trainer") -> list[float]:
    """Per timed round: `minus`'s seconds (the whole trainer step's) minus the variant's."""
    return [whole - part for whole, part in zip(seconds[minus][1:], seconds[variant][1:])]


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="tiny model, few rounds: a smoke run")
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--steps", type=int, default=3, help="steps per side per round")
    parser.add_argument("--compiles", type=int, default=3, help="timed compiles of each variant")
    parser.add_argument("--cold", type=int, default=0, help="fresh child processes per side for first compiles")
    parser.add_argument("--compile_alone", choices=(*VARIANTS, "hand_written"), help=argparse.SUPPRESS)
    parser.add_argument("--out")
    options = parser.parse_args(argv)
    if options.compile_alone:
        result = compile_alone(options.compile_alone, options.quick)
        print(json.dumps(result))
        return result
    config = transformers.LlamaConfig(**{**CONFIG, **(QUICK if options.quick else {})})
    length = 16 if options.quick else LENGTH
    rounds, compiles = (3, 1) if options.quick else (options.rounds, options.compiles)
    blocks = token_blocks(config, options.quick)
    run_loop, _ = hand_written_loop(config, blocks, seed=0)
    trainer = build_trainer(config, blocks, steps=1, every=1, callbacks=[])
    trainer.setup()
    batch = trainer.to_global(next(trainer.dataloaders.train.iterator(0)))
    jitted = {name: variant_step(trainer, name) for name in VARIANTS}
    jitted["trainer"].lower(trainer.state, batch).compile()  # the process's first compile: untimed warm-up
    lowerings = {name: functools.partial(fn.lower, trainer.state, batch) for name, fn in jitted.items()}
    compile_seconds, compiled = compile_round_robin({**lowerings, "hand_written": run_loop.lower}, compiles)
    states = {name: jax.tree.map(jnp.copy, trainer.state) for name in VARIANTS}  # each step donates its own

    def time_variant(name: str) -> float:
        started = time.perf_counter()
        if name == "hand_written":
            run_loop(options.steps)  # ends with a host read of the loss: synchronised
        else:
            for _ in range(options.steps):
                states[name], _ = compiled[name](states[name], batch)
            jax.block_until_ready(states[name].params)
        return (time.perf_counter() - started) / options.steps

    sides = (*VARIANTS, "hand_written")
    seconds: dict[str, list[float]] = {name: [] for name in sides}
    for r in range(rounds):
        for name in sides if r % 2 == 0 else sides[::-1]:
            seconds[name].append(time_variant(name))
    ms = {name: round(1000 * statistics.median(s[1:]), 2) for name, s in seconds.items()}
    # Paired per round (the two ran seconds apart), so the machine's drift cancels; min and max show the spread.
    part_seconds = {part: paired(seconds, variant) for part, variant in PARTS.items()}
    result = {
        "benchmark": "step_breakdown", "params": sum(x.size for x in jax.tree.leaves(trainer.state.params)),
        "tokens_per_step": BATCH * length, "rounds": rounds - 1, "steps_per_round": options.steps,
        "ms_per_step": ms, "ms_per_step_min": {n: round(1000 * min(s), 2) for n, s in seconds.items()},
        "compile_seconds": compile_seconds,
        "ratio_hand_written_over_trainer": round(ms["hand_written"] / ms["trainer"], 4),
        "part_ms": {part: round(1000 * statistics.median(d), 2) for part, d in part_seconds.items()},
        "part_ms_spread": {part: [round(1000 * min(d), 2), round(1000 * max(d), 2)]
                           for part, d in part_seconds.items()},
        "part_compile_seconds": {part: round(compile_seconds["trainer"] - compile_seconds[v], 3)
                                 for part, v in PARTS.items()},
        "ratio_compile_trainer_over_hand_written": round(compile_seconds["trainer"]
                                                         / compile_seconds["hand_written"], 4),
        "extras_ms": round(1000 * statistics.median(paired(seconds, "no_extras")), 2),
        # What is left once all three are gone: the rest of the trainer's step against the hand-written one.
        "residual_ms": round(1000 * statistics.median(paired(seconds, "hand_written", minus="no_extras")), 2),
        **(cold_compiles(options.cold, options.quick) if options.cold else {}),
    }
    return emit(result, options.out)


if __name__ == "__main__":
    relaunch_like_the_command()
    main()
