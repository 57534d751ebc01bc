"""DPO: step time against an SFT step on the same tokens, and the memory each kind of reference costs.

    python -m benchmarks.dpo [--quick] [--out FILE]

1. **Step time.** Trainers on the same Llama config, the same `max_length` T and the same
   tokens per step: `SFTTrainer` on a batch of 2B sequences, `DPOTrainer` with its default frozen
   reference (`state.frozen["reference"]`), `DPOTrainer(precompute_ref_log_probs=True)`, TR-DPO moving
   its reference after every update (`dpo_sync_every_step`: `sync_ref_model`, `ref_model_sync_steps=1`,
   the most a sync can cost) and the adapter-off LoRA side below, each DPO side on a batch of B pairs
   (`[B, 2, T]`: the same 2B sequences). Batches are fixed: random tokens at full
   length (no padding), the second half of each row supervised (the "completion"; SFT supervises the
   same positions), placed on the device once with the trainer's own `to_global`. The precomputed
   side's `ref_logps` are the initial policy's log-probs of that batch. Each side runs its trainer's
   compiled `train_step` (state donated). After compilation and warm-up steps, timed windows of
   `--steps` steps alternate between the sides (the order rotates every repeat), `--repeats`
   times; each window ends when the device is done. Reported: wall seconds per step, and this
   process's CPU seconds per step (`time.process_time()`, all threads: steadier than wall time when
   other work shares the cores), each as median, min, max over windows, and DPO / SFT ratios of both
   (of the medians, of the minimums, and per repeat: a DPO window over the SFT window of the same repeat).
2. **Reference memory.** Per side: the bytes of the train state (`jax.tree.leaves(trainer.state)`,
   split into params / optimizer / frozen), live device bytes added by `setup()` (`jax.live_arrays()`
   after `gc.collect()`), and the compiled train step's `memory_analysis()` (argument, output, alias,
   temp bytes). CPU backends have no peak-memory counter (`Device.memory_stats()` is None): the
   "step peak estimate" is argument + output - alias + temp bytes of the executable. With `--naive_step`
   (the full profile's default), a DPO trainer whose `pair_logps` uses a naive float32 `log_softmax` is
   compiled (never run) to show what the chunked log-probs save inside the real step. The adapter-off
   side `dpo_adapter_off_lora` trains rank-`--lora_rank` adapters on every projection and uses the policy
   with its adapters off as the reference: no reference weights in the state (its `frozen` is 0) and no
   full-size optimizer state.
3. **Log-prob memory.** Compiled temporary bytes of `easytrain.sequence_logps.token_logps` against
   `jax.nn.log_softmax` + gather (forward; gradient; value and gradient together, as a train step
   needs), at `--logps_shape` (default 8 x 256 x 32768) for bfloat16 and float32 logits. Nothing is
   allocated: the functions are lowered on shapes. `output_bytes` is what the pass returns (the
   gradient is a [B, T, V] array in the logits' dtype either way).

Prints a table and one JSON line (also written to `--out`). No timing is asserted anywhere.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import statistics
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from easytrain import TrainingArguments  # noqa: E402
from easytrain.models.presets import PRESETS  # noqa: E402
from easytrain.preference import sequence_logps, token_logps  # noqa: E402
from easytrain.tasks.arithmetic import (build_arithmetic_chat_tokenizer, make_arithmetic_chat_splits,  # noqa: E402
                                        make_arithmetic_preference_splits)
from easytrain.trainers.dpo import DPOArguments, DPOTrainer  # noqa: E402
from easytrain.trainers.sft import SFTArguments, SFTTrainer  # noqa: E402
from benchmarks.report import emit, fill_defaults, relaunch_like_the_command, step_memory  # noqa: E402
from benchmarks.dpo_table import print_table  # noqa: E402

#: Sizes of one run: the full profile, and `--quick` (under a minute on 2 CPU cores).
PROFILES = {
    "full": dict(model_config="small", vocab_size=4096, max_length=128, pairs=4, steps=2, repeats=12,
                 warmup_steps=2, logps_shape=[8, 256, 32768], naive_step=True),
    "quick": dict(model_config="tiny", vocab_size=1024, max_length=32, pairs=4, steps=3, repeats=5,
                  warmup_steps=1, logps_shape=[8, 256, 32768], naive_step=False),
}
SIDES = ("sft", "dpo_frozen", "dpo_precomputed", "dpo_sync_every_step", "dpo_adapter_off_lora")
NO_PEAK_REASON = ("this backend has no peak-memory counter (Device.memory_stats() is None on CPU); reported instead: "
                  "train-state bytes, live device bytes after setup, and the compiled step's memory_analysis().")


class NaiveLogpsDPOTrainer(DPOTrainer):
    """`DPOTrainer` with the log-probs of a float32 `log_softmax` over `[2B, T, V]` (compiled, never run)."""

    def pair_logps(self, model, batch):
        rows, _, length = batch["input_ids"].shape
        flat = lambda x: x.reshape((rows * 2, length))
        logits_NTV = model(flat(batch["input_ids"]), attention_mask_BT=flat(batch["attention_mask"]))
        logps_NT = naive_token_logps(logits_NTV, flat(batch["targets"]))
        sums_N, counts_N = sequence_logps(logps_NT, flat(batch["loss_mask"]))
        mean_logits_N = jnp.sum(jnp.mean(logits_NTV.astype(jnp.float32), axis=-1) * flat(batch["loss_mask"]), -1)
        return sums_N.reshape(rows, 2), counts_N.reshape(rows, 2), mean_logits_N.reshape(rows, 2)


def naive_token_logps(logits_BTV: jax.Array, targets_BT: jax.Array) -> jax.Array:
    """What `token_logps` replaces: a float32 log-softmax over all of [B, T, V], then a gather."""
    log_probs_BTV = jax.nn.log_softmax(logits_BTV.astype(jnp.float32), axis=-1)
    return jnp.take_along_axis(log_probs_BTV, targets_BT[..., None], axis=-1)[..., 0]


@dataclass
class Side:
    """One contender: its trainer, its own train state, its fixed device batch and its timed windows."""

    name: str
    trainer: Any
    batch: dict[str, jax.Array] | None = None
    state: Any = None
    step_seconds: list[float] = field(default_factory=list)  # wall clock per step, one value per window
    step_cpu_seconds: list[float] = field(default_factory=list)  # this process's CPU time (all threads) per step
    first_step_seconds: float = 0.0

    def step(self) -> None:
        self.state, _metrics = self.trainer.functions.train_step(self.state, self.batch)

    def window(self, steps: int) -> None:
        started, cpu = time.perf_counter(), time.process_time()
        for _ in range(steps):
            self.step()
        jax.block_until_ready(self.state.params)
        self.step_seconds.append((time.perf_counter() - started) / steps)
        self.step_cpu_seconds.append((time.process_time() - cpu) / steps)


def live_bytes() -> int:
    gc.collect()  # arrays of dropped objects stay live until collected
    return int(sum(array.nbytes for array in jax.live_arrays()))


def tree_bytes(tree: Any) -> int:
    return int(sum(leaf.nbytes for leaf in jax.tree.leaves(tree)))


def state_bytes(state: Any) -> dict[str, int]:
    parts = {"params": tree_bytes(state.params), "opt_state": tree_bytes(state.opt_state),
             "model_state": tree_bytes(state.model_state), "frozen": tree_bytes(state.frozen),
             "base": tree_bytes(state.base)}
    return {"total": tree_bytes(state), **parts}


def memory_analysis(jitted: Callable[..., Any], *args: Any) -> dict[str, int] | None:
    """Argument / output / alias / temp bytes of the executable `jitted` compiles for `args`."""
    return step_memory(jitted.lower(*args).compile())


def spread(values: list[float], digits: int = 4) -> dict[str, float]:
    return {"median": round(statistics.median(values), digits), "min": round(min(values), digits),
            "max": round(max(values), digits)}


def model_config_file(options: argparse.Namespace, directory: Path) -> str:
    """A config.json for the preset at `--vocab_size` (a preset alone is sized to the tokenizer's 21 ids)."""
    if options.model_config not in PRESETS:
        return options.model_config  # a config.json given as is
    tokenizer = build_arithmetic_chat_tokenizer()
    path = directory / "config.json"
    path.write_text(json.dumps(dict(PRESETS[options.model_config], vocab_size=options.vocab_size,
                                    bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                                    pad_token_id=tokenizer.pad_token_id)))
    return str(path)


def build_trainer(kind: str, options: argparse.Namespace, config: str, output_dir: str) -> Any:
    """A set-up trainer of one kind; its data are a few arithmetic rows (the timed batches are synthetic)."""
    sequences = 2 * options.pairs
    arguments = TrainingArguments(
        compilation_cache_dir="",  # no persistent cache: every process compiles cold, as its contender
        output_dir=output_dir, model_config=config, max_length=options.max_length,
        train_batch_size=sequences if kind == "sft" else options.pairs, eval_batch_size=options.pairs,
        max_steps=1_000_000, learning_rate=1e-4, warmup_steps=0, lr_scheduler_type="constant",
        eval_strategy="no", save_strategy="no", report_to=["none"], disable_progress_bar=True,
        save_pretrained_at_end=False, validation_split_percentage=0, seed=0,
        lora_rank=options.lora_rank if kind == "dpo_adapter_off_lora" else 0)
    tokenizer = build_arithmetic_chat_tokenizer()
    if kind == "sft":
        data = make_arithmetic_chat_splits(4 * sequences, 1, seed=0)["train"]
        trainer = SFTTrainer(arguments, SFTArguments(packing=False), tokenizer=tokenizer, dataset_train=data)
    else:
        data = make_arithmetic_preference_splits(4 * options.pairs, 1, seed=0)["train"]
        dpo = DPOArguments(precompute_ref_log_probs=kind == "dpo_precomputed",
                           sync_ref_model=kind == "dpo_sync_every_step", ref_model_sync_steps=1)
        cls = NaiveLogpsDPOTrainer if kind == "dpo_naive_logps" else DPOTrainer
        trainer = cls(arguments, dpo, tokenizer=tokenizer, dataset_train=data)
    trainer.setup()
    return trainer


def synthetic_sequences(options: argparse.Namespace, vocab_size: int) -> dict[str, np.ndarray]:
    """2B full-length rows of random tokens, [2B, T] each; rows 2b and 2b + 1 are pair b (chosen, rejected)."""
    rows, length = 2 * options.pairs, options.max_length
    tokens = np.random.default_rng(0).integers(0, vocab_size, (rows, length + 1))
    completion = np.zeros((rows, length), np.float32)
    completion[:, length // 2:] = 1.0  # the first half is the "prompt", the second the "completion"
    return {"input_ids": tokens[:, :-1], "targets": tokens[:, 1:], "loss_mask": completion,
            "segment_ids": np.ones((rows, length)), "positions": np.broadcast_to(np.arange(length), (rows, length)),
            "attention_mask": np.ones((rows, length))}


def fixed_batch(trainer: Any, sequences: dict[str, np.ndarray], paired: bool) -> dict[str, np.ndarray]:
    """The synthetic rows in the layout and dtypes of the trainer's own `collate` (checked on a real batch)."""
    iterator = trainer.dataloaders.train.iterator(0)
    real = next(iterator)
    iterator.close()
    batch = {}
    for key, value in sequences.items():
        value = value.reshape(-1, 2, value.shape[-1]) if paired else value
        batch[key] = np.ascontiguousarray(value, dtype=real[key].dtype)
        assert batch[key].ndim == real[key].ndim, (key, batch[key].shape, real[key].shape)
    batch["example_id"] = np.arange(len(batch["input_ids"]), dtype=np.int32)
    missing = set(real) - set(batch) - {"ref_logps"}
    assert not missing, f"the trainer's batches have fields this benchmark does not fill: {missing}"
    return batch


def reference_logps(trainer: DPOTrainer, batch: dict[str, jax.Array]) -> np.ndarray:
    """The initial policy's [B, 2] log-probs of `batch`: what precomputation would carry for it."""
    fn = jax.jit(lambda state, batch: trainer.pair_logps(state.model(train=False), batch)[0])
    return np.asarray(fn(trainer.state, batch))


#: What is compiled for the log-prob comparison: the forward alone, the gradient alone (as in
#: tests/test_preference_losses.py), and loss value and gradient together (what a train step needs).
PASSES = (
    ("forward", lambda f: f),
    ("gradient", lambda f: jax.grad(lambda x, t: jnp.sum(f(x, t)))),
    ("value_and_grad", lambda f: jax.value_and_grad(lambda x, t: jnp.sum(f(x, t)))),
)


def logps_memory(shape: list[int], chunk_size: int) -> dict[str, Any]:
    """Compiled temp bytes of chunked `token_logps` vs `log_softmax` + gather, forward and gradient."""
    B, T, V = shape
    targets = jax.ShapeDtypeStruct((B, T), jnp.int32)
    chunked = lambda x, t: token_logps(x, t, chunk_size)
    result: dict[str, Any] = {"shape_BTV": [B, T, V], "chunk_size": chunk_size, "float32_BTV_bytes": B * T * V * 4}
    for dtype in (jnp.bfloat16, jnp.float32):
        logits = jax.ShapeDtypeStruct((B, T, V), dtype)
        row: dict[str, Any] = {"logits_bytes": B * T * V * jnp.dtype(dtype).itemsize}
        for pass_name, wrap in PASSES:
            analyses = {name: jax.jit(wrap(fn)).lower(logits, targets).compile().memory_analysis()
                        for name, fn in (("chunked", chunked), ("naive", naive_token_logps))}
            temps = {name: int(analysis.temp_size_in_bytes) for name, analysis in analyses.items()}
            row[pass_name] = {"chunked_temp_bytes": temps["chunked"], "naive_temp_bytes": temps["naive"],
                              "naive_over_chunked": round(temps["naive"] / max(temps["chunked"], 1), 1),
                              "output_bytes": int(analyses["chunked"].output_size_in_bytes)}
        result[jnp.dtype(dtype).name] = row
    return result


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny model, max_length 32 (under a minute)")
    parser.add_argument("--out", help="also write the JSON result to this file")
    parser.add_argument("--model_config", help="Llama preset or config.json (full: small, quick: tiny)")
    for name, help_text in (("vocab_size", "vocabulary of a preset (a config.json keeps its own)"),
                            ("max_length", "positions per sequence"), ("pairs", "DPO pairs per step (SFT: 2x rows)"),
                            ("steps", "steps per timed window"), ("repeats", "timed windows per side"),
                            ("warmup_steps", "untimed steps per side after compilation")):
        parser.add_argument(f"--{name}", type=int, help=f"{help_text} (default: from the profile)")
    parser.add_argument("--logps_shape", type=int, nargs=3, metavar=("B", "T", "V"),
                        help="logits shape of the log-prob memory comparison (default 8 256 32768)")
    parser.add_argument("--naive_step", action=argparse.BooleanOptionalAction,
                        help="also compile a DPO step with a naive log_softmax for its memory (default: full yes, "
                             "quick no: one more trainer and compilation)")
    parser.add_argument("--lora_rank", type=int, default=16, help="adapter rank of the dpo_adapter_off_lora side")
    parser.add_argument("--logps_chunk_size", type=int, default=DPOArguments.logps_chunk_size,
                        help="vocabulary chunk of token_logps there (DPOArguments' default)")
    options = parser.parse_args(argv)
    options.profile = "quick" if options.quick else "full"
    fill_defaults(options, PROFILES[options.profile])
    return options


def main(argv: list[str] | None = None) -> dict[str, Any]:
    options = parse(argv)
    started, load_at_start = time.perf_counter(), os.getloadavg()[0]
    device = jax.devices()[0]
    with tempfile.TemporaryDirectory(prefix="easytrain-bench-dpo-") as scratch:
        config = model_config_file(options, Path(scratch))
        sides, setup_live, before = {}, {}, live_bytes()
        for kind in SIDES:
            sides[kind] = Side(kind, build_trainer(kind, options, config, str(Path(scratch) / kind)))
            now = live_bytes()
            setup_live[kind], before = now - before, now
        states = {kind: state_bytes(side.trainer.state) for kind, side in sides.items()}
        vocab_size = int(sides["sft"].trainer.model_config.vocab_size)
        sequences = synthetic_sequences(options, vocab_size)
        for kind, side in sides.items():
            side.batch = side.trainer.to_global(fixed_batch(side.trainer, sequences, paired=kind != "sft"))
        pre = sides["dpo_precomputed"]
        pre.batch["ref_logps"] = jax.device_put(reference_logps(pre.trainer, pre.batch),
                                                pre.batch["input_ids"].sharding)
        params = int(sum(leaf.size for leaf in jax.tree.leaves(pre.trainer.state.params)))

        for side in sides.values():  # compile (timed apart), then warm up
            side.state = side.trainer.state
            first = time.perf_counter()
            side.step()
            jax.block_until_ready(side.state.params)
            side.first_step_seconds = time.perf_counter() - first
            for _ in range(options.warmup_steps):
                side.step()
            jax.block_until_ready(side.state.params)
        order = list(sides.values())
        for repeat in range(options.repeats):  # rotate so no side always runs right after the same one
            for side in order[repeat % len(order):] + order[:repeat % len(order)]:
                side.window(options.steps)

        step_memories = {kind: memory_analysis(side.trainer.functions.train_step, side.state, side.batch)
                         for kind, side in sides.items()}
        step_memories["dpo_frozen_naive_logps"] = None
        if options.naive_step:
            naive = build_trainer("dpo_naive_logps", options, config, str(Path(scratch) / "naive"))
            step_memories["dpo_frozen_naive_logps"] = memory_analysis(naive.functions.train_step, naive.state,
                                                                      sides["dpo_frozen"].batch)
            del naive
    logps = logps_memory(options.logps_shape, options.logps_chunk_size)
    memory_stats = device.memory_stats()


    def ratios(key: str) -> dict[str, dict[str, Any]]:
        """DPO over SFT: of the medians, of the minimums (the least disturbed windows), and per repeat."""
        sft = getattr(sides["sft"], key)
        return {kind: {"of_medians": round(statistics.median(getattr(sides[kind], key)) / statistics.median(sft), 3),
                       "of_minimums": round(min(getattr(sides[kind], key)) / min(sft), 3),
                       "per_repeat": spread([a / b for a, b in zip(getattr(sides[kind], key), sft)], 3)}
                for kind in SIDES[1:]}

    result = {
        "benchmark": "dpo_step_and_memory", "device": device.device_kind, "platform": device.platform,
        "cpu_count": os.cpu_count(), "jax": jax.__version__, "profile": options.profile,
        "model_config": options.model_config, "vocab_size": vocab_size, "params": params,
        "max_length": options.max_length, "pairs_per_step": options.pairs, "sequences_per_step": 2 * options.pairs,
        "tokens_per_step": 2 * options.pairs * options.max_length, "steps_per_window": options.steps,
        "repeats": options.repeats,
        "step_seconds": {kind: spread(side.step_seconds) for kind, side in sides.items()},
        "ratio_over_sft": ratios("step_seconds"),
        "step_cpu_seconds": {kind: spread(side.step_cpu_seconds) for kind, side in sides.items()},
        "cpu_ratio_over_sft": ratios("step_cpu_seconds"),
        "first_step_seconds": {kind: round(side.first_step_seconds, 2) for kind, side in sides.items()},
        "memory": {
            "device_peak_bytes": None if not memory_stats else memory_stats.get("peak_bytes_in_use"),
            "device_peak_note": None if memory_stats else NO_PEAK_REASON,
            "state_bytes": states, "live_bytes_added_by_setup": setup_live, "train_step": step_memories,
            "lora_rank": options.lora_rank,
        },
        "logps_memory": logps,
        "total_seconds": round(time.perf_counter() - started, 1),
        "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "load_average_1m": [round(load_at_start, 2), round(os.getloadavg()[0], 2)],  # other work on the machine
    }
    print_table(result)
    return emit(result, options.out)


if __name__ == "__main__":
    relaunch_like_the_command()
    main()
