"""Trainer overhead: `BaseTrainer` vs a minimal hand-written `jax.jit` loop on the same model.

    python -m benchmarks.overhead [--quick] [--rounds 5] [--steps_per_round 10] [--repeats 2] [--out FILE]

Same model (Llama-style, 6.3M parameters), same token blocks, same AdamW, same XLA options (the trainer's
`compiler_options='auto'`, so the ratio is the trainer's own cost). Speed is alternated in one process:
every `steps_per_round` trainer steps, a callback runs as many hand-written steps, so both sides see the
same machine state; steady-state tokens/s of each side is the median over rounds (the first round, which
holds compilation, is excluded), and each round's paired ratio is reported too, with their median. First-step
compile time (`compile_seconds`: trace + compile of the step, and for the trainer its launch), the first step until
its results are ready (`first_step_ready_seconds`, the run included), that minus the median later step
(`first_step_over_median_seconds`, EasyDeL's "compile") and peak RSS come from each side alone in a fresh child
process (`--repeats` of each, alternating), so both compile cold and neither's memory counts against the other.
Both import the same modules; the peak is counted from there (Linux `clear_refs`), and `added_rss` is that peak minus
the RSS at that moment: what building and training the model took. The planned memory of each compiled step
(`easytrain.memory_plan`: XLA's per-device buffer assignment, no noise) is compared too. Prints one JSON line.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import statistics
import time
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import datasets  # noqa: E402
import jax  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
import transformers  # noqa: E402
from flax import nnx  # noqa: E402

from easytrain import BaseTrainer, Callback, TrainingArguments, compiler_options, flops  # noqa: E402
from easytrain.memory_plan import MIB, plan_of  # noqa: E402
from easytrain.models import init_model  # noqa: E402
from easytrain.tasks import build_arithmetic_tokenizer  # noqa: E402
from benchmarks.report import child_json, emit, relaunch_like_the_command, scratch_dir  # noqa: E402

CONFIG = dict(vocab_size=4096, hidden_size=256, intermediate_size=1024, num_hidden_layers=4,
              num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=2048)
BATCH, LENGTH, LR, WD = 8, 256, 3e-4, 0.01
QUICK = dict(vocab_size=256, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
             num_key_value_heads=2)


def token_blocks(config: transformers.LlamaConfig, quick: bool) -> np.ndarray:
    """The benchmark's random token blocks: 16 batches of `LENGTH + 1` tokens (16 + 1 with `quick`)."""
    length = 16 if quick else LENGTH
    return np.random.default_rng(0).integers(0, config.vocab_size, (BATCH * 16, length + 1)).astype(np.int32)


def hand_written_loop(config: transformers.LlamaConfig, blocks: np.ndarray, seed: int, batch: int = BATCH,
                      compile_now: bool = True):
    """The reference: split once, pure jitted step with donation, token-mean cross-entropy.

    Returns `run(num_steps)` (its `lower()` lowers the jitted step again, from shapes) and the compile seconds;
    with `compile_now=False`, nothing is compiled (None seconds) until `run.lower().compile()` or `run`'s first call.
    """
    graphdef, params, rest = nnx.split(init_model(config, seed=seed), nnx.Param, ...)
    params, rest = nnx.to_pure_dict(params), nnx.to_pure_dict(rest)
    tx = optax.adamw(LR, weight_decay=WD)
    opt_state = tx.init(params)

    options = compiler_options.for_platform(compiler_options.AUTO, jax.default_backend())

    @functools.partial(jax.jit, donate_argnums=(0, 1), compiler_options=options)
    def step(params, opt_state, inputs, targets):
        def loss_fn(params):
            logits = nnx.merge(graphdef, params, rest)(inputs)
            return optax.softmax_cross_entropy_with_integer_labels(logits, targets).mean()

        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    order = np.random.default_rng(seed).permutation(len(blocks))
    carry = {"params": params, "opt": opt_state, "cursor": 0}

    def run(num_steps: int) -> float:
        for _ in range(num_steps):
            rows = order[np.arange(carry["cursor"], carry["cursor"] + batch) % len(blocks)]
            carry["cursor"] += batch
            tokens = blocks[rows]
            carry["params"], carry["opt"], loss = step(carry["params"], carry["opt"], tokens[:, :-1], tokens[:, 1:])
        return float(loss)  # one sync per segment, as the trainer does per logging window

    # Shapes only: `lower` again later (step_breakdown's compile timing) once `run` has donated the arrays.
    shapes = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype),
                          (params, opt_state, blocks[:batch, :-1], blocks[:batch, 1:]))
    run.lower = functools.partial(step.lower, *shapes)  # the jitted step, before `step` names its executable
    if not compile_now:
        return run, None
    started = time.perf_counter()
    compiled = step.lower(params, opt_state, blocks[:batch, :-1], blocks[:batch, 1:]).compile()
    compile_seconds = time.perf_counter() - started
    step = compiled  # `run` calls the executable compiled (and timed) here: no second compile
    run.memory_plan = plan_of(compiled)
    return run, compile_seconds


class StepClock(Callback):
    """Blocks at every step's end and stamps it: the first step from `on_train_begin` until step 1's parameters are
    ready, and each later step whole (as EasyDeL's loop, which blocks on every step, is timed)."""

    def __init__(self):
        self.stamps: list[float] = []

    def on_train_begin(self, trainer):
        flops.hardware_peak()  # cached: the loop's own call before step 1 then costs nothing
        self.stamps.append(time.perf_counter())

    def on_step_end(self, trainer, step):
        jax.block_until_ready(trainer.state.params)
        self.stamps.append(time.perf_counter())


def first_step_fields(stamps: list[float]) -> dict[str, float]:
    """From the start and every step's end: the first step whole, and it minus the median later step."""
    steps = [b - a for a, b in zip(stamps, stamps[1:])]
    later = statistics.median(steps[1:]) if len(steps) > 1 else 0.0
    return {"first_step_ready_seconds": steps[0], "first_step_over_median_seconds": steps[0] - later}


class Alternate(Callback):
    """Every `every` trainer steps: time that trainer segment, then run and time a hand-written one."""

    def __init__(self, run_loop, every: int):
        self.run_loop, self.every = run_loop, every
        self.trainer_seconds: list[float] = []
        self.loop_seconds: list[float] = []
        self.mark = time.perf_counter()

    def on_step_end(self, trainer, step):
        if step % self.every:
            return
        jax.block_until_ready(trainer.state.params)
        now = time.perf_counter()
        self.trainer_seconds.append(now - self.mark)
        self.run_loop(self.every)
        self.mark = time.perf_counter()
        self.loop_seconds.append(self.mark - now)


def build_trainer(config: transformers.LlamaConfig, blocks: np.ndarray, steps: int, every: int,
                  callbacks: list[Callback], eval_blocks: np.ndarray | None = None, **overrides: Any) -> BaseTrainer:
    """The trainer side: the same model, blocks and AdamW, logging every `every` steps, nothing else unless
    `overrides` (`TrainingArguments` fields) turn it on; `eval_blocks` are the eval set's token blocks."""
    arguments = TrainingArguments(**{
        "compilation_cache_dir": "",  # no persistent cache: every process compiles cold, as its contender
        "output_dir": scratch_dir("easytrain-bench-"), "max_length": blocks.shape[1] - 1,
        "train_batch_size": BATCH, "max_steps": steps, "learning_rate": LR, "weight_decay": WD,
        "lr_scheduler_type": "constant", "max_grad_norm": 0.0, "logging_steps": every, "eval_strategy": "no",
        "save_strategy": "no", "report_to": ["none"], "disable_progress_bar": True, "save_pretrained_at_end": False,
        "validation_split_percentage": 0, **overrides})
    evaluated = None if eval_blocks is None else datasets.Dataset.from_dict({"input_ids": eval_blocks})
    return BaseTrainer(arguments, model=init_model(config, seed=0), tokenizer=build_arithmetic_tokenizer(),
                       dataset_train=datasets.Dataset.from_dict({"input_ids": blocks}), dataset_eval=evaluated,
                       callbacks=callbacks)


def memory_mib(field: str) -> float:
    """`VmRSS` (now) or `VmHWM` (peak since the last `reset_peak_rss`) of this process, from /proc."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    raise KeyError(field)


def reset_peak_rss() -> None:
    """Restart the peak-RSS count from the current RSS (Linux), so import-time peaks do not hide training's."""
    with open("/proc/self/clear_refs", "w") as clear:
        clear.write("5")


def standard_error(values: list[float]) -> float:
    """The standard error of the mean of `values` (0 for fewer than two)."""
    return statistics.stdev(values) / len(values) ** 0.5 if len(values) > 1 else 0.0


def run_side(side: str, config: transformers.LlamaConfig, blocks: np.ndarray, steps: int) -> dict:
    """One side alone in a fresh process: its first-step compile seconds, its first step until ready (and that minus
    its median later step), and its peak RSS from the moment every module is imported (both sides import the same
    ones) with what training added to that baseline. Both sides wait for every step here, as EasyDeL does."""
    reset_peak_rss()
    baseline = memory_mib("VmRSS")
    if side == "trainer":
        clock = StepClock()
        trainer = build_trainer(config, blocks, steps, every=steps, callbacks=[clock])
        trainer.setup()
        trainer.train()
        compile_seconds, stamps = trainer.loop.compile_seconds, clock.stamps
    else:
        run_loop, compile_seconds = hand_written_loop(config, blocks, seed=0)
        stamps = [time.perf_counter() - compile_seconds]  # the first step starts with the compile
        for _ in range(steps):
            run_loop(1)  # returns the loss as a float: the step has finished
            stamps.append(time.perf_counter())
    peak = memory_mib("VmHWM")
    return {"side": side, "compile_seconds": compile_seconds, **first_step_fields(stamps), "peak_rss_mib": peak,
            "added_rss_mib": peak - baseline}


def run_sides(options: argparse.Namespace) -> dict[str, list[dict]]:
    """Each side `--repeats` times in its own child process, alternating, so compilation starts cold."""
    sides: dict[str, list[dict]] = {"trainer": [], "loop": []}
    for repeat in range(options.repeats):
        for side in ("trainer", "loop") if repeat % 2 == 0 else ("loop", "trainer"):
            sides[side].append(child_json("benchmarks.overhead", "--side", side, "--steps_per_round",
                                          str(options.steps_per_round), *(["--quick"] if options.quick else [])))
    return sides


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="tiny model and few steps: a smoke run")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps_per_round", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=2, help="cold-start child processes per side")
    parser.add_argument("--side", choices=("trainer", "loop"), help=argparse.SUPPRESS)
    parser.add_argument("--out")
    options = parser.parse_args(argv)
    config = transformers.LlamaConfig(**{**CONFIG, **(QUICK if options.quick else {})})
    length = 16 if options.quick else LENGTH
    blocks = token_blocks(config, options.quick)
    if options.side:
        result = run_side(options.side, config, blocks, options.steps_per_round)
        print(json.dumps(result))
        return result
    rounds = 2 if options.quick else options.rounds
    run_loop, _ = hand_written_loop(config, blocks, seed=0)
    run_loop(1)  # first real call: warm the hand-written step outside the timed rounds
    alternate = Alternate(run_loop, options.steps_per_round)
    trainer = build_trainer(config, blocks, rounds * options.steps_per_round, options.steps_per_round, [alternate])
    trainer.setup()
    alternate.mark = time.perf_counter()
    trainer.train()
    tokens = options.steps_per_round * BATCH * length
    trainer_tps = statistics.median(tokens / s for s in alternate.trainer_seconds[1:])
    loop_tps = statistics.median(tokens / s for s in alternate.loop_seconds[1:])
    # Each round's trainer segment and the hand-written one right after it saw nearly the same machine.
    per_round = [loop / trainer for trainer, loop in zip(alternate.trainer_seconds[1:], alternate.loop_seconds[1:])]
    sides = run_sides(options)

    def median_of(side: str, key: str) -> float:
        return statistics.median(r[key] for r in sides[side])

    compile_ratio = median_of("trainer", "compile_seconds") / median_of("loop", "compile_seconds")
    planned = {"trainer": trainer.loop.memory_plan.peak / MIB, "loop": run_loop.memory_plan.peak / MIB}
    rss_ratio = median_of("trainer", "peak_rss_mib") / median_of("loop", "peak_rss_mib")
    added_ratio = median_of("trainer", "added_rss_mib") / median_of("loop", "added_rss_mib")
    result = {
        "benchmark": "overhead", "device": jax.devices()[0].device_kind,
        "params": sum(x.size for x in jax.tree.leaves(nnx.state(init_model(config), nnx.Param))),
        "tokens_per_step": BATCH * length, "rounds": rounds - 1, "steps_per_round": options.steps_per_round,
        "trainer_tokens_per_second": round(trainer_tps, 1), "loop_tokens_per_second": round(loop_tps, 1),
        "ratio_trainer_over_loop": round(trainer_tps / loop_tps, 4),
        "ratio_trainer_over_loop_per_round": [round(r, 4) for r in per_round],
        "ratio_trainer_over_loop_paired_median": round(statistics.median(per_round), 4),  # drift cancels per round
        # How far the mean of the paired ratios may be from the true one: it shrinks with more rounds.
        "ratio_trainer_over_loop_paired_mean": round(statistics.fmean(per_round), 4),
        "ratio_trainer_over_loop_paired_standard_error": round(standard_error(per_round), 4),
        "trainer_compile_seconds": [round(r["compile_seconds"], 3) for r in sides["trainer"]],
        "loop_compile_seconds": [round(r["compile_seconds"], 3) for r in sides["loop"]],
        **{f"{side}_{key}": [round(r[key], 3) for r in sides[side]] for side in ("trainer", "loop")
           for key in ("first_step_ready_seconds", "first_step_over_median_seconds")},
        "ratio_compile_trainer_over_loop": round(compile_ratio, 4),
        "trainer_peak_rss_mib": [round(r["peak_rss_mib"], 1) for r in sides["trainer"]],
        "loop_peak_rss_mib": [round(r["peak_rss_mib"], 1) for r in sides["loop"]],
        "ratio_peak_rss_trainer_over_loop": round(rss_ratio, 4),
        "trainer_added_rss_mib": [round(r["added_rss_mib"], 1) for r in sides["trainer"]],
        "loop_added_rss_mib": [round(r["added_rss_mib"], 1) for r in sides["loop"]],
        "ratio_added_rss_trainer_over_loop": round(added_ratio, 4),
        # XLA's buffer assignment of each compiled step, per device: deterministic, unlike RSS.
        "trainer_planned_memory_mib": round(planned["trainer"], 2),
        "loop_planned_memory_mib": round(planned["loop"], 2),
        "ratio_planned_memory_trainer_over_loop": round(planned["trainer"] / planned["loop"], 4),
        "load_average": list(os.getloadavg()),
    }
    return emit(result, options.out)


if __name__ == "__main__":
    relaunch_like_the_command()
    main()
