"""Trainer overhead: `BaseTrainer` vs a minimal hand-written `jax.jit` loop, alternated in one process.

    python benchmarks/overhead.py [--rounds 5] [--steps_per_round 10]

Same model (Llama-style, 6.3M parameters), same token blocks, same AdamW. Every `steps_per_round`
trainer steps, a callback runs as many hand-written steps, so both sides see the same machine
state; steady-state tokens/s of each side is the median over rounds (the first round, which holds
compilation, is excluded). Prints one JSON line.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import resource
import statistics
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import datasets  # noqa: E402
import jax  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
import transformers  # noqa: E402
from flax import nnx  # noqa: E402

from easytrain import BaseTrainer, Callback, TrainingArguments  # noqa: E402
from easytrain.models import init_model  # noqa: E402
from easytrain.tasks import build_arithmetic_tokenizer  # noqa: E402

CONFIG = dict(vocab_size=4096, hidden_size=256, intermediate_size=1024, num_hidden_layers=4,
              num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=2048)
BATCH, LENGTH, LR, WD = 8, 256, 3e-4, 0.01


def hand_written_loop(config: transformers.LlamaConfig, blocks: np.ndarray, seed: int):
    """The reference: split once, pure jitted step with donation, token-mean cross-entropy."""
    graphdef, params, rest = nnx.split(init_model(config, seed=seed), nnx.Param, ...)
    params, rest = nnx.to_pure_dict(params), nnx.to_pure_dict(rest)
    tx = optax.adamw(LR, weight_decay=WD)
    opt_state = tx.init(params)

    @functools.partial(jax.jit, donate_argnums=(0, 1))
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
            rows = order[np.arange(carry["cursor"], carry["cursor"] + BATCH) % len(blocks)]
            carry["cursor"] += BATCH
            batch = blocks[rows]
            carry["params"], carry["opt"], loss = step(carry["params"], carry["opt"], batch[:, :-1], batch[:, 1:])
        return float(loss)  # one sync per segment, as the trainer does per logging window

    started = time.perf_counter()
    compiled = step.lower(params, opt_state, blocks[:BATCH, :-1], blocks[:BATCH, 1:]).compile()
    compile_seconds = time.perf_counter() - started
    step = compiled  # `run` calls the executable compiled (and timed) here: no second compile
    return run, compile_seconds


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


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps_per_round", type=int, default=10)
    options = parser.parse_args(argv)
    config = transformers.LlamaConfig(**CONFIG)
    num_rows = BATCH * 16
    blocks = np.random.default_rng(0).integers(0, CONFIG["vocab_size"], (num_rows, LENGTH + 1)).astype(np.int32)
    run_loop, loop_compile = hand_written_loop(config, blocks, seed=0)
    run_loop(1)  # first real call: warm the hand-written step outside the timed rounds
    steps = options.rounds * options.steps_per_round
    arguments = TrainingArguments(
        output_dir=tempfile.mkdtemp(prefix="easytrain-bench-"), max_length=LENGTH, train_batch_size=BATCH,
        max_steps=steps, learning_rate=LR, weight_decay=WD, lr_scheduler_type="constant", max_grad_norm=0.0,
        logging_steps=options.steps_per_round, eval_strategy="no", save_strategy="no", report_to=["none"],
        disable_progress_bar=True, save_pretrained_at_end=False, validation_split_percentage=0)
    alternate = Alternate(run_loop, options.steps_per_round)
    trainer = BaseTrainer(arguments, model=init_model(config, seed=0), tokenizer=build_arithmetic_tokenizer(),
                          dataset_train=datasets.Dataset.from_dict({"input_ids": blocks}), callbacks=[alternate])
    trainer.setup()
    alternate.mark = time.perf_counter()
    trainer.train()
    tokens = options.steps_per_round * BATCH * LENGTH
    trainer_tps = statistics.median(tokens / s for s in alternate.trainer_seconds[1:])
    loop_tps = statistics.median(tokens / s for s in alternate.loop_seconds[1:])
    result = {
        "benchmark": "overhead", "device": jax.devices()[0].device_kind, "params": 6_293_760,
        "tokens_per_step": BATCH * LENGTH, "rounds": options.rounds - 1, "steps_per_round": options.steps_per_round,
        "trainer_tokens_per_second": round(trainer_tps, 1), "loop_tokens_per_second": round(loop_tps, 1),
        "ratio_trainer_over_loop": round(trainer_tps / loop_tps, 4),
        "trainer_first_step_seconds": round(trainer.loop.compile_seconds, 3),
        "loop_compile_seconds": round(loop_compile, 3),
        "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
    }
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
