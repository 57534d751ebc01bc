"""The trainer's host work per step, where the model is too small to hide it.

    python -m benchmarks.host_overhead [--quick] [--size tiny|small] [--rounds 12] [--steps_per_round 100] [--out FILE]

`overhead.py`'s comparison (the trainer's loop against the hand-written jitted loop, alternated in one process,
`--steps_per_round` steps each per round, the first round warm-up) on its tiny Llama (one layer, hidden 32,
vocabulary 256, batch 8 x 16 tokens): a step the device finishes in about half a millisecond, so whatever the
loop does on the host around it (loading and uploading the batch, counting tokens, callbacks, the job record,
logging) shows in the step time instead of hiding behind the device. The benchmark Llama of `overhead.py` runs
the same loop 400 times slower, where none of this is visible. Also the host cost of each per-step part alone,
timed in a callback in the middle of the run (median over `--part_calls` calls): what to look at first.
`--size small` (two layers, hidden 128, vocabulary 1024, 8 x 32 tokens) makes the step about 9 ms, where the
same host work is a few percent of it. Prints one JSON line.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from typing import Any, Callable

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import numpy as np  # noqa: E402
import transformers  # noqa: E402

from benchmarks.overhead import (BATCH, CONFIG, QUICK, Alternate, build_trainer, hand_written_loop,  # noqa: E402
                                 token_blocks)
from benchmarks.report import emit, relaunch_like_the_command  # noqa: E402
from easytrain import Callback  # noqa: E402

#: Model and sequence length of each `--size`: `tiny` is `overhead.py`'s quick Llama and its 16-token blocks.
SIZES = {"tiny": (QUICK, 16),
         "small": (dict(vocab_size=1024, hidden_size=128, intermediate_size=512, num_hidden_layers=2,
                        num_attention_heads=2, num_key_value_heads=2), 32)}


def microseconds_per_call(fn: Callable[[], Any], calls: int) -> float:
    """Median microseconds of `calls` calls of `fn`, after one untimed call."""
    fn()
    times = []
    for _ in range(calls):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return round(statistics.median(times) * 1e6, 1)


class TimeParts(Callback):
    """At step `at`: the host cost of each per-step part of the loop, each called alone `calls` times in a row (the
    batches drawn here are taken from the run's own loader, which the random-token benchmark does not mind)."""

    def __init__(self, at: int, calls: int):
        self.at, self.calls = at, calls
        self.parts: dict[str, float] = {}

    def on_step_end(self, trainer: Any, step: int) -> None:
        if step != self.at:
            return
        loop, others = trainer.loop, [c for c in trainer.callbacks.callbacks if c is not self]
        batch = next(loop.iterator)
        self.parts = {
            "next_batch": microseconds_per_call(lambda: next(loop.iterator), self.calls),  # the loader, not ahead
            "to_device": microseconds_per_call(lambda: loop.parts.to_device(batch), self.calls),
            "count": microseconds_per_call(lambda: loop.count(batch), self.calls),
            "callbacks": microseconds_per_call(lambda: [c.on_step_end(trainer, step) for c in others], self.calls),
        }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="few rounds and steps: a smoke run")
    parser.add_argument("--size", choices=tuple(SIZES), default="tiny")
    parser.add_argument("--rounds", type=int, default=12)
    parser.add_argument("--steps_per_round", type=int, default=100)
    parser.add_argument("--part_calls", type=int, default=300)
    parser.add_argument("--out")
    options = parser.parse_args(argv)
    rounds, every, calls = (3, 10, 20) if options.quick else (options.rounds, options.steps_per_round,
                                                              options.part_calls)
    overrides, length = SIZES[options.size]
    config = transformers.LlamaConfig(**{**CONFIG, **overrides})
    blocks = (token_blocks(config, quick=True) if options.size == "tiny" else
              np.random.default_rng(0).integers(0, config.vocab_size, (BATCH * 16, length + 1)).astype(np.int32))
    run_loop, _ = hand_written_loop(config, blocks, seed=0)
    run_loop(1)  # warm outside the timed rounds
    alternate, parts = Alternate(run_loop, every), TimeParts(at=every * rounds // 2 + 1, calls=calls)
    trainer = build_trainer(config, blocks, rounds * every, every, [alternate, parts])
    trainer.setup()
    alternate.mark = time.perf_counter()
    trainer.train()
    trainer_ms = [1e3 * s / every for s in alternate.trainer_seconds[1:]]
    loop_ms = [1e3 * s / every for s in alternate.loop_seconds[1:]]
    per_round = [loop / trainer for trainer, loop in zip(trainer_ms, loop_ms)]  # tokens/s, trainer / loop
    result = {
        "benchmark": "host_overhead", "size": options.size, "tokens_per_step": BATCH * length, "rounds": rounds - 1,
        "steps_per_round": every,
        "trainer_ms_per_step": round(statistics.median(trainer_ms), 4),
        "loop_ms_per_step": round(statistics.median(loop_ms), 4),
        "ratio_trainer_over_loop": round(statistics.median(loop_ms) / statistics.median(trainer_ms), 4),
        "ratio_trainer_over_loop_per_round": [round(r, 4) for r in per_round],
        "ratio_trainer_over_loop_paired_median": round(statistics.median(per_round), 4),
        "trainer_extra_us_per_step": round(1e3 * statistics.median(t - h for t, h in zip(trainer_ms, loop_ms)), 1),
        "part_us_per_call": parts.parts,
        "load_average": list(os.getloadavg()),
    }
    return emit(result, options.out)


if __name__ == "__main__":
    relaunch_like_the_command()
    main()
