"""SFT throughput: packing vs padding to bucket lengths, alternated in one process.

    python -m benchmarks.sft [--quick] [--out FILE]

The data are conversations generated here, no network: a log-normal number of tokens per
conversation (many short ones, a long tail cut at `max_length`, like real chat data), made of
addition turns of a Zipf-like number of digits (the user asks `"37+45"`, the assistant answers
`"37+45=82"`), tokenised character by character by the arithmetic chat tokenizer, with only the
assistant turns supervised (`assistant_only_loss`). Two `SFTTrainer`s on the same data, same model
(a Llama preset, same initialisation), same `max_length` and rows per step: `packing=True` (one
shape) and `packing=False` (one example per row, right-padded to the smallest bucket length that
fits the batch's longest: one compiled shape per bucket).

Every bucket shape is compiled before timing (one batch per bucket built by the trainer's own
`collate`), then both sides run a few steps, then timed windows of `--steps` optimizer steps alternate
between the two, `--repeats` times. Each window runs the trainer's own pieces (its data loader,
`collate`, `to_global`, `train_iteration`) and ends when the device is done. Reported per side:
median, min and max over windows of supervised tokens/s (the sum of the batches' `loss_mask`, what
both train on), real tokens/s (`attention_mask`), steps/s; fill rates; the number of compiled shapes.
Prints a table and one JSON line (also written to `--out`). No timing is asserted anywhere.
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import datasets  # noqa: E402
import jax  # noqa: E402
import numpy as np  # noqa: E402

from easytrain import TrainingArguments  # noqa: E402
from easytrain.data import bucket_lengths  # noqa: E402
from easytrain.tasks.arithmetic import build_arithmetic_chat_tokenizer  # noqa: E402
from easytrain.trainers.sft import SFTArguments, SFTTrainer  # noqa: E402
from benchmarks.report import emit, fill_defaults, relaunch_like_the_command  # noqa: E402

#: Sizes of one run: the full profile, and `--quick` (under a minute on 2 CPU cores).
PROFILES = {
    "full": dict(model_config="small", max_length=256, batch_size=8, num_conversations=4000, steps=10,
                 repeats=7, warmup_steps=3),
    "quick": dict(model_config="tiny", max_length=64, batch_size=8, num_conversations=1200, steps=20,
                  repeats=5, warmup_steps=2),
}
#: Conversation lengths (tokens) are log-normal: median `max_length / MEDIAN_DIVISOR`, this sigma.
MEDIAN_DIVISOR, SIGMA = 6, 0.9
#: Special tokens of one turn in the arithmetic chat template: <|user|> <|end|> <|assistant|> <|end|>.
TURN_SPECIALS = 4


def make_conversations(num: int, max_length: int, seed: int = 0) -> tuple[datasets.Dataset, np.ndarray]:
    """`num` conversations whose token counts are log-normal, cut at one turn past `max_length + 1`.

    Returns the dataset (a `messages` column) and the target length of each conversation.
    """
    rng = np.random.default_rng(seed)
    targets = np.exp(rng.normal(np.log(max_length / MEDIAN_DIVISOR), SIGMA, num))
    rows = []
    for target in targets:
        messages, tokens = [], 1  # BOS
        while not messages or tokens < min(target, max_length + 1):
            a, b = (int(rng.integers(0, 10 ** min(int(rng.geometric(0.5)), 6))) for _ in range(2))
            user, answer = f"{a}+{b}", f"{a}+{b}={a + b}"
            messages += [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]
            tokens += TURN_SPECIALS + len(user) + len(answer)
        rows.append({"messages": messages})
    return datasets.Dataset.from_list(rows), targets


@dataclass
class Side:
    """One contender: its trainer, its own train state and data iterator, and what its windows measured."""

    name: str
    trainer: SFTTrainer
    state: Any = None
    iterator: Any = None
    windows: list[dict[str, float]] = field(default_factory=list)
    shapes: dict[int, int] = field(default_factory=dict)  # row length -> timed batches with it
    positions: int = 0
    real: int = 0

    def start(self) -> None:
        self.state = self.trainer.state
        self.iterator = self.trainer.dataloaders.train.iterator(0)

    def step(self, batch: dict[str, np.ndarray]) -> None:
        self.state, _metrics = self.trainer.train_iteration(self.state, self.trainer.to_global(batch))

    def window(self, steps: int) -> None:
        """`steps` steps from the trainer's own loader, timed until the device has finished them."""
        supervised = real = positions = 0
        started = time.perf_counter()
        for _ in range(steps):
            batch = next(self.iterator)
            self.step(batch)
            supervised += float(np.sum(batch["loss_mask"]))
            real += self.trainer.count_tokens(batch)
            positions += batch["input_ids"].size
            length = batch["input_ids"].shape[1]
            self.shapes[length] = self.shapes.get(length, 0) + 1
        jax.block_until_ready(self.state.params)
        seconds = time.perf_counter() - started
        self.positions += positions
        self.real += real
        self.windows.append({"supervised_tokens_per_second": supervised / seconds,
                             "real_tokens_per_second": real / seconds, "steps_per_second": steps / seconds,
                             "supervised": supervised, "seconds": seconds})

    def compile_buckets(self, buckets: tuple[int, ...]) -> list[int]:
        """Run one batch per bucket shape that this data can produce (so nothing compiles while timed).

        A bucket `b` is used by a batch whose longest example has `prev < tokens - 1 <= b` positions;
        the batch is one such example plus the shortest ones, collated by the trainer itself.
        """
        rows = self.trainer.dataset_train.with_format("numpy")
        pairs = np.asarray(rows["length"]) - 1
        shortest = np.argsort(pairs, kind="stable")
        batch_size = self.trainer.arguments.train_batch_size
        compiled, previous = [], 0
        for bucket in buckets:
            longest = np.flatnonzero((pairs > previous) & (pairs <= bucket))
            previous = bucket
            if not longest.size:
                continue  # no example has this many positions: no batch can use this bucket
            indices = np.concatenate([longest[:1], shortest[:batch_size - 1]]).astype(np.int64)
            batch = self.trainer.collate(dict(rows[indices.tolist()]), indices.astype(np.int32))
            assert batch["input_ids"].shape[1] == bucket, (batch["input_ids"].shape, bucket)
            self.step(batch)
            compiled.append(bucket)
        jax.block_until_ready(self.state.params)
        return compiled


def compiled_count(trainer: SFTTrainer) -> int | None:
    """Executables in the train step's jit cache (a private JAX method: None if it is gone)."""
    size = getattr(trainer.functions.train_step, "_cache_size", None)
    return int(size()) if callable(size) else None


def spread(values: list[float], digits: int = 1) -> dict[str, float]:
    return {"median": round(statistics.median(values), digits), "min": round(min(values), digits),
            "max": round(max(values), digits)}


def build_trainer(options: argparse.Namespace, packing: bool, dataset: datasets.Dataset,
                  output_dir: str) -> SFTTrainer:
    arguments = TrainingArguments(
        compilation_cache_dir="",  # no persistent cache: every process compiles cold, as its contender
        output_dir=output_dir, model_config=options.model_config, max_length=options.max_length,
        train_batch_size=options.batch_size, max_steps=1_000_000, learning_rate=1e-3, warmup_steps=0,
        lr_scheduler_type="constant", eval_strategy="no", save_strategy="no", report_to=["none"],
        disable_progress_bar=True, save_pretrained_at_end=False, validation_split_percentage=0, seed=0)
    trainer = SFTTrainer(arguments, SFTArguments(packing=packing, assistant_only_loss=True),
                         tokenizer=build_arithmetic_chat_tokenizer(), dataset_train=dataset)
    trainer.setup()
    return trainer


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small model, max_length 64 (under a minute)")
    parser.add_argument("--out", help="also write the JSON result to this file")
    parser.add_argument("--model_config", help="Llama preset or config.json (full: small, quick: tiny)")
    for name, help_text in (("max_length", "positions per row"), ("batch_size", "rows per step, both sides"),
                            ("num_conversations", "generated conversations"),
                            ("steps", "optimizer steps per timed window"), ("repeats", "timed windows per side"),
                            ("warmup_steps", "untimed steps per side after compilation")):
        parser.add_argument(f"--{name}", type=int, help=f"{help_text} (default: from the profile)")
    options = parser.parse_args(argv)
    fill_defaults(options, PROFILES["quick" if options.quick else "full"])
    return options


def main(argv: list[str] | None = None) -> dict[str, Any]:
    options = parse(argv)
    started, load_at_start = time.perf_counter(), os.getloadavg()[0]
    dataset, target_lengths = make_conversations(options.num_conversations, options.max_length)
    sides = []
    with tempfile.TemporaryDirectory(prefix="easytrain-bench-sft-") as scratch:
        for packing in (True, False):
            trainer = build_trainer(options, packing, dataset, str(Path(scratch) / str(packing)))
            sides.append(Side("packing" if packing else "padding", trainer))
        packed, padded = sides
        for side in sides:
            side.start()
        buckets = bucket_lengths(options.max_length)  # what SFTTrainer pads to in a single-process run
        before = time.perf_counter()
        padding_buckets = padded.compile_buckets(buckets)  # packing has one shape: its first warm-up step compiles it
        compile_seconds = time.perf_counter() - before
        for side in sides:
            for _ in range(options.warmup_steps):
                side.step(next(side.iterator))
            jax.block_until_ready(side.state.params)
        cache_before = [compiled_count(side.trainer) for side in sides]
        for _ in range(options.repeats):
            for side in sides:
                side.window(options.steps)
        cache_after = [compiled_count(side.trainer) for side in sides]
        for side in sides:
            side.iterator.close()
    stats = packed.trainer.data_stats["train"]
    pack_sup = [w["supervised_tokens_per_second"] for w in packed.windows]
    pad_sup = [w["supervised_tokens_per_second"] for w in padded.windows]
    lengths = np.asarray(padded.trainer.dataset_train["length"])

    def overall(side: Side) -> float:
        return sum(w["supervised"] for w in side.windows) / sum(w["seconds"] for w in side.windows)

    def side_result(side: Side, fill_rate: float, shapes: int | None) -> dict[str, Any]:
        return {
            **{key: spread([w[key] for w in side.windows], 3 if key == "steps_per_second" else 1)
               for key in ("supervised_tokens_per_second", "real_tokens_per_second", "steps_per_second")},
            "supervised_tokens_per_second_overall": round(overall(side), 1),  # all windows' tokens / their time
            "fill_rate": round(fill_rate, 4), "compiled_shapes": shapes,
            "timed_batches_by_row_length": {str(k): v for k, v in sorted(side.shapes.items())},
        }

    result = {
        "benchmark": "sft_packing_vs_padding", "device": jax.devices()[0].device_kind, "cpu_count": os.cpu_count(),
        "model_config": options.model_config,
        "params": int(sum(leaf.size for leaf in jax.tree.leaves(packed.state.params))),
        "max_length": options.max_length, "rows_per_step": options.batch_size,
        "steps_per_window": options.steps, "repeats": options.repeats,
        "data": {
            "conversations": options.num_conversations, "kept": stats["num_kept"], "truncated": stats["truncated"],
            "tokens_median": int(np.median(lengths)), "tokens_p90": int(np.percentile(lengths, 90)),
            "tokens_max": int(lengths.max()), "tokens_mean": round(float(lengths.mean()), 1),
            "supervised_fraction": round(stats["num_supervised_tokens"] / stats["num_tokens"], 4),
            "target_tokens_median": round(float(np.median(target_lengths)), 1),
        },
        "packing": side_result(packed, stats["packing_fill_rate"], cache_after[0] or len(packed.shapes)),
        "padding": {**side_result(padded, padded.real / padded.positions, cache_after[1] or len(padding_buckets)),
                    "buckets": list(buckets), "buckets_compiled": padding_buckets},
        "speedup_supervised_tokens_per_second": {
            "median_ratio": round(statistics.median(pack_sup) / statistics.median(pad_sup), 3),
            "overall_ratio": round(overall(packed) / overall(padded), 3),
            **{f"per_repeat_{k}": v for k, v in spread([a / b for a, b in zip(pack_sup, pad_sup)], 3).items()},
        },
        "compiles_while_timed": (None if None in cache_before + cache_after
                                 else sum(a - b for a, b in zip(cache_after, cache_before))),
        "padding_compile_seconds": round(compile_seconds, 2),
        "total_seconds": round(time.perf_counter() - started, 1),
        "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "load_average_1m": [round(load_at_start, 2), round(os.getloadavg()[0], 2)],  # other work on the machine
    }
    print_table(result)
    return emit(result, options.out)


def print_table(result: dict[str, Any]) -> None:
    rows = [("", "packing", "padding")]
    for key, label in (("supervised_tokens_per_second", "supervised tokens/s"),
                       ("real_tokens_per_second", "real tokens/s"), ("steps_per_second", "steps/s")):
        rows.append((f"{label} (median [min, max])",
                     *(f"{r[key]['median']} [{r[key]['min']}, {r[key]['max']}]"
                       for r in (result["packing"], result["padding"]))))
    for key, label in (("fill_rate", "fill rate (real / positions)"), ("compiled_shapes", "compiled shapes")):
        rows.append((label, str(result["packing"][key]), str(result["padding"][key])))
    widths = [max(len(row[i]) for row in rows) for i in range(3)]
    for row in rows:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths)))
    speedup = result["speedup_supervised_tokens_per_second"]
    print(f"speedup (packing / padding, supervised tokens/s): {speedup['median_ratio']}x of the medians, "
          f"{speedup['overall_ratio']}x overall (per repeat {speedup['per_repeat_min']}-{speedup['per_repeat_max']})")


if __name__ == "__main__":
    relaunch_like_the_command()
    main()
