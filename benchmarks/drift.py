"""Whether a long run stays as fast and as lean as it starts: step time, device arrays and host memory, step by step.

    python -m benchmarks.drift [--quick] [--steps 500] [--logging_steps 10] [--every 50] [--out FILE]

The `overhead` benchmark's Llama and random token blocks (its tiny Llama with `--quick`), trained for `--steps`
with an evaluation and an asynchronous checkpoint every `--every` steps (the newest two kept), as a real run goes:
what a run keeps by mistake usually comes from those, or from every step. At each log the window's seconds per
step (the loop takes evaluation and checkpointing off its clock) and, after a garbage collection, this process's
live device arrays (count and MiB), Python objects, resident memory and threads. Reported, from the end of the
run's first quarter (compilation, the first saves and caches filling) to its last log before the end (where the
loop finishes its saves): the least-squares slope of the step time against the step, per 1000 steps, as a fraction
of the mean step time, with its standard error, and the median step time of the fourth quarter over the second's;
for each resource, its floor (the least of its samples) in the second quarter and in the fourth, and the growth
between them per 1000 steps. The floors, not the samples, because a save in flight holds copies of the state
for a moment, and a log deferred behind the next step sees that step's scratch memory mapped. A run that does not
drift shows a step-time slope within a few standard errors of zero, a quarter ratio near 1 and floors that do not
grow. Prints one JSON line.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import os
import statistics
import threading
import time
from typing import Any, Sequence

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import jax  # noqa: E402
import numpy as np  # noqa: E402
import transformers  # noqa: E402

from benchmarks.overhead import BATCH, CONFIG, LENGTH, QUICK, build_trainer, memory_mib, token_blocks  # noqa: E402
from benchmarks.report import emit, fill_defaults, relaunch_like_the_command  # noqa: E402
from easytrain import Callback  # noqa: E402
from easytrain.memory_plan import MIB  # noqa: E402

#: What each log samples besides the step time.
RESOURCES = ("live_arrays", "live_array_mib", "python_objects", "rss_mib", "threads")


@dataclasses.dataclass(frozen=True)
class Sample:
    """One log's window and what the process held right after it."""

    step: int
    seconds_per_step: float
    live_arrays: int
    live_array_mib: float
    python_objects: int
    rss_mib: float
    threads: int


class Probe(Callback):
    """Samples the process at every log, off the step clock: a log that runs while the next step computes counts
    toward the next window (`TrainLoop.log`), so the probe moves that window's start past its own work."""

    def __init__(self) -> None:
        self.samples: list[Sample] = []

    def on_log(self, trainer: Any, step: int, logs: dict[str, float]) -> None:
        started = time.perf_counter()
        gc.collect()
        arrays = jax.live_arrays()
        self.samples.append(Sample(step, logs["step_time"], len(arrays), sum(a.nbytes for a in arrays) / MIB,
                                   len(gc.get_objects()), memory_mib("VmRSS"), threading.active_count()))
        trainer.loop.window_start += time.perf_counter() - started


def fit_slope(xs: Sequence[float], ys: Sequence[float]) -> tuple[float, float]:
    """Least-squares slope of `ys` against `xs` and its standard error (0 with fewer than three points)."""
    x, y = np.asarray(xs, np.float64), np.asarray(ys, np.float64)
    centred = x - x.mean()
    spread = float(np.sum(centred ** 2))
    slope = float(np.sum(centred * (y - y.mean())) / spread)
    if len(x) < 3:
        return slope, 0.0
    residuals = y - y.mean() - slope * centred
    return slope, float(np.sqrt(np.sum(residuals ** 2) / (len(x) - 2) / spread))


def quarter(samples: list[Sample], total_steps: int, index: int) -> list[Sample]:
    """The samples inside quarter `index` (0-3) of the run, the run's last log left out."""
    low, high = index * total_steps / 4, (index + 1) * total_steps / 4
    return [s for s in samples if low < s.step <= high and s.step < total_steps]


def summarise(samples: list[Sample], total_steps: int) -> dict[str, Any]:
    """The step time's slope per 1000 steps over the last three quarters and its fourth / second quarter ratio;
    each resource's floor in the second and fourth quarters and its growth per 1000 steps between them."""
    second, fourth = quarter(samples, total_steps, 1), quarter(samples, total_steps, 3)
    steady = [s for s in samples if total_steps / 4 < s.step < total_steps]
    if not second or not fourth:
        raise ValueError(f"no log in the second or the fourth quarter of {total_steps} steps; log more often "
                         "(--logging_steps) or train longer (--steps).")
    seconds = [s.seconds_per_step for s in steady]
    mean = statistics.fmean(seconds)
    slope, error = fit_slope([s.step for s in steady], seconds)
    result = {
        "mean_ms_per_step": round(1e3 * mean, 3),
        "step_time_slope_per_1000_steps": round(1000 * slope / mean, 5),  # a fraction of the mean step time
        "step_time_slope_standard_error": round(1000 * error / mean, 5),
        "ratio_fourth_over_second_quarter": round(statistics.median(s.seconds_per_step for s in fourth)
                                                  / statistics.median(s.seconds_per_step for s in second), 4),
    }
    for name in RESOURCES:
        early, late = (min(getattr(s, name) for s in part) for part in (second, fourth))
        result[name] = {"second_quarter_floor": round(early, 3), "fourth_quarter_floor": round(late, 3),
                        "growth_per_1000_steps": round(1000 * (late - early) / (total_steps / 2), 3)}
    return result


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true",
                        help="the tiny Llama, 120 steps logged every 5, evaluated and saved every 20: a smoke run")
    parser.add_argument("--steps", type=int, help="default 500 (--quick 120)")
    parser.add_argument("--logging_steps", type=int, help="default 10 (--quick 5)")
    parser.add_argument("--every", type=int, help="steps between evaluations and checkpoints: default 50 (--quick 20)")
    parser.add_argument("--out")
    options = parser.parse_args(argv)
    fill_defaults(options, dict(steps=120, logging_steps=5, every=20) if options.quick
                  else dict(steps=500, logging_steps=10, every=50))
    config = transformers.LlamaConfig(**{**CONFIG, **(QUICK if options.quick else {})})
    blocks = token_blocks(config, options.quick)
    eval_blocks = np.random.default_rng(1).integers(0, config.vocab_size, (BATCH * 2, blocks.shape[1]), np.int32)
    probe = Probe()
    build_trainer(config, blocks, options.steps, options.logging_steps, [probe], eval_blocks=eval_blocks,
                  eval_batch_size=BATCH, eval_strategy="steps", eval_steps=options.every, save_strategy="steps",
                  save_steps=options.every, save_total_limit=2, async_checkpointing=True).train()
    result = {
        "benchmark": "drift", "device": jax.devices()[0].device_kind, "steps": options.steps,
        "logging_steps": options.logging_steps, "eval_and_save_every": options.every,
        "tokens_per_step": BATCH * (16 if options.quick else LENGTH),
        **summarise(probe.samples, options.steps),
        "samples": [dataclasses.asdict(s) for s in probe.samples],
        "load_average": list(os.getloadavg()),
    }
    return emit(result, options.out)


if __name__ == "__main__":
    relaunch_like_the_command()
    main()
