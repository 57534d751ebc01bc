"""EasyDeL's `Trainer` on the work of benchmarks/overhead.py; runs in EasyDeL's own environment (not easytrain's).

    /path/to/easydel-venv/bin/python benchmarks/peers/easydel_llama.py [--steps 60] [--warmup 10] [--window_steps 10]
        [--quick]

Same Llama (vocab 4096, hidden 256, 4 layers, 4 heads, 4 KV heads, SwiGLU 1024, untied head), float32
params and compute, batch 8 x 256 tokens, AdamW (lr 3e-4, wd 0.01, constant, no clipping), random token
rows from numpy (seed 0) as a `datasets.Dataset`. Evaluation, saving, wandb, metric reporting and the
memory monitor are off (`performance_mode`). EasyDeL's loop blocks on every step, so a timestamp taken in
its `on_step_end` hook closes that step. tokens/s is measured as easytrain's side is (`benchmarks/overhead.py`'s
rounds): the steps after `--warmup` cut into windows of `--window_steps` consecutive steps, each window's
tokens over the time from the `on_step_end` before it to its last one (the whole loop, data and hooks
included), the median over windows (`window_rates`). The median of single steps' rates, which leaves out
every slow step where a window keeps it, is reported beside it. `first_step_seconds` runs from
`on_step_start` to `on_step_end` of step 1 (trace, compile and one execution); `compile_seconds` is that
minus the median steady step. The persistent compilation cache that
EasyDeL turns on at import is switched off, so every run compiles from scratch. Standalone on purpose
(it must not import easytrain). Prints one JSON line; a failure inside EasyDeL is reported in `error`.
"""

from __future__ import annotations

import argparse
import atexit
import json
import os
import resource
import shutil
import statistics
import sys
import tempfile
import time
import traceback

SCRATCH = tempfile.mkdtemp(prefix="easydel-peer-")  # EasyDeL's checkpoint and compile-cache folders
atexit.register(shutil.rmtree, SCRATCH, ignore_errors=True)
os.environ.setdefault("COMPILE_FUNC_DIR", os.path.join(SCRATCH, "compile-cache"))
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

CONFIG = dict(vocab_size=4096, hidden_size=256, intermediate_size=1024, num_hidden_layers=4,
              num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=2048)
QUICK = dict(vocab_size=256, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
             num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64)
LR, WD = 3e-4, 0.01


def versions() -> dict[str, str | None]:
    from importlib.metadata import PackageNotFoundError, version

    found = {}
    for name in ("easydel", "jax", "jaxlib", "flax", "optax", "eformer", "ejkernel"):
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            found[name] = None
    return found


def window_rates(step_ends: list[float], warmup: int, window_steps: int, tokens_per_step: int) -> list[float]:
    """Tokens/s of each window of `window_steps` consecutive steps after the first `warmup`, from the times at
    which steps ended: a window runs from the end of the step before it to the end of its last step. Steps
    past the last whole window are left out."""
    timed = step_ends[warmup - 1:]
    return [window_steps * tokens_per_step / (timed[end] - timed[end - window_steps])
            for end in range(window_steps, len(timed), window_steps)]


def run(options: argparse.Namespace) -> dict:
    import datasets
    import easydel as ed
    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    jax.config.update("jax_enable_compilation_cache", False)  # cold compile every run, as in easytrain's
    config_kwargs = QUICK if options.quick else CONFIG
    steps = options.warmup + options.steps
    rows = np.random.default_rng(0).integers(0, config_kwargs["vocab_size"], (options.batch * steps, options.length))
    dataset = datasets.Dataset.from_dict({"input_ids": rows.astype(np.int32)})
    config = ed.LlamaConfig(**config_kwargs, tie_word_embeddings=False)
    model = ed.LlamaForCausalLM(config=config, dtype=jnp.float32, param_dtype=jnp.float32, rngs=nnx.Rngs(0))
    arguments = ed.TrainingArguments(
        save_directory=os.path.join(SCRATCH, "checkpoints"), model_name="peer", max_length=options.length,
        total_batch_size=options.batch, max_training_steps=steps, num_train_epochs=1,
        learning_rate=LR, weight_decay=WD, optimizer=ed.EasyDeLOptimizers.ADAMW, scheduler=ed.EasyDeLSchedulers.NONE,
        clip_grad=None, do_eval=False, do_last_save=False, save_steps=None, resume_if_possible=False,
        use_wandb=False, report_metrics=False, performance_mode=True, log_grad_norms=False,
        log_steps=10**9, shuffle_train_dataset=False, verbose=False)
    stamps: dict[str, list] = {"start": [], "end": [], "loss": []}

    class Timed(ed.Trainer):
        """Timestamps around each step: EasyDeL blocks on the step's result before `on_step_end`."""

        def on_step_start(self, state, step):
            stamps["start"].append(time.perf_counter())
            return super().on_step_start(state=state, step=step)

        def on_step_end(self, state, metrics, step):
            stamps["end"].append(time.perf_counter())
            stamps["loss"].append(metrics.loss)  # converted after the loop: no extra host sync per step
            return super().on_step_end(state=state, metrics=metrics, step=step)

    trainer = Timed(arguments=arguments, model=model, dataset_train=dataset)
    trainer.train()
    ends = stamps["end"]
    if len(ends) != steps:
        raise RuntimeError(f"EasyDeL ran {len(ends)} steps, expected {steps}")
    tokens = options.batch * options.length
    step_seconds = [b - a for a, b in zip(ends[options.warmup - 1:], ends[options.warmup:])]
    median_step = statistics.median(step_seconds)
    windows = window_rates(ends, options.warmup, options.window_steps, tokens)
    first_step = ends[0] - stamps["start"][0]
    return {
        "tokens_per_second": round(statistics.median(windows), 1),
        "tokens_per_second_spread": [round(min(windows), 1), round(max(windows), 1)],
        "window_tokens_per_second": [round(rate, 1) for rate in windows], "window_steps": options.window_steps,
        "tokens_per_second_per_step_median": round(tokens / median_step, 1),
        "tokens_per_second_per_step_spread": [round(tokens / max(step_seconds), 1),
                                              round(tokens / min(step_seconds), 1)],
        "compile_seconds": round(first_step - median_step, 3), "first_step_seconds": round(first_step, 3),
        "median_step_seconds": round(median_step, 5), "timed_steps": len(step_seconds),
        "step_seconds": [round(seconds, 5) for seconds in step_seconds],
        "warmup_steps": options.warmup, "tokens_per_step": tokens, "final_loss": round(float(stamps["loss"][-1]), 4),
        "device": jax.devices()[0].device_kind,
        "params": sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param))),
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=60, help="timed steps after the warm-up")
    parser.add_argument("--warmup", type=int, default=10, help="untimed steps (the first compiles)")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--length", type=int, default=256)
    parser.add_argument("--window_steps", type=int, default=10, help="steps per timed window (tokens/s: their median)")
    parser.add_argument("--quick", action="store_true", help="tiny model, batch 2 x 16, 2 + 3 steps")
    options = parser.parse_args(argv)
    if options.quick:
        options.steps, options.warmup, options.batch, options.length, options.window_steps = 3, 2, 2, 16, 1
    if options.warmup < 1 or options.steps < 1:
        parser.error("--warmup and --steps must be at least 1 (the first step compiles)")
    if not 1 <= options.window_steps <= options.steps:
        parser.error(f"--window_steps must be between 1 and --steps ({options.steps}); got {options.window_steps}")
    result = {"contender": "easydel", "tokens_per_second": None, "compile_seconds": None, "peak_rss_mib": None,
              "versions": versions(), "quick": options.quick, "batch": options.batch, "length": options.length,
              "error": None}
    started = time.perf_counter()
    try:
        result.update(run(options))
    except Exception as error:  # a peer failure is a result to record, not a crash of the suite
        traceback.print_exc(file=sys.stderr)
        result["error"] = f"{type(error).__name__}: {error}"[:2000]
    result["wall_seconds"] = round(time.perf_counter() - started, 1)
    result["peak_rss_mib"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    print(json.dumps(result), flush=True)
    return result


if __name__ == "__main__":
    main()
