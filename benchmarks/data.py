"""Data pipeline: tokenise, pack and batch throughput against what training consumes, and resume cost.

    python -m benchmarks.data [--quick] [--out FILE]

The data are `benchmarks.sft`'s generated chat conversations (log-normal lengths, only the answers
supervised). Measured in one process:

1. **Preparation**: `tokenize_sft_dataset` (chat template, masks; one process) and `pack_examples`
   (best-fit decreasing), as `SFTTrainer` runs them: tokens per second of each and of both.
2. **Batching**: the trainer's own loader (`TrainBatches` + `packed_collate`, grain prefetch) drained
   for `--batches` batches without training: tokens per second.
3. **Consumption**: the same `SFTTrainer` (packing, the `--model_config` preset) training on those
   batches after compilation and warm-up: tokens per second of the train step.
4. **Resume**: seconds from `loader.iterator(step)` to its first batch for steps 0, 1k, 100k, 10M: a
   resumed run seeks to its position, it never reads the batches before it.

Ratios: preparation and batching over consumption (the pipeline must not be what training waits for;
preparation runs once per run, batching every step). No timing is asserted anywhere.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import jax  # noqa: E402
import numpy as np  # noqa: E402

from benchmarks.sft import make_conversations  # noqa: E402
from easytrain import TrainingArguments  # noqa: E402
from easytrain.data import SFTDataOptions, pack_examples, tokenize_sft_dataset  # noqa: E402
from easytrain.tasks.arithmetic import build_arithmetic_chat_tokenizer  # noqa: E402
from easytrain.trainers.sft import SFTArguments, SFTTrainer  # noqa: E402
from benchmarks.report import emit, fill_defaults, relaunch_like_the_command  # noqa: E402

PROFILES = {"full": dict(model_config="small", conversations=8000, max_length=256, batch_size=8, batches=200,
                         train_steps=10),
            "quick": dict(model_config="tiny", conversations=600, max_length=64, batch_size=8, batches=40,
                          train_steps=5)}
RESUME_STEPS = (0, 1_000, 100_000, 10_000_000)


def timed(fn: Any) -> tuple[Any, float]:
    started = time.perf_counter()
    value = fn()
    return value, time.perf_counter() - started


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny model, 600 conversations")
    for name in ("conversations", "max_length", "batch_size", "batches", "train_steps"):
        parser.add_argument(f"--{name}", type=int, help="(default: from the profile)")
    parser.add_argument("--model_config", help="Llama preset of the consuming trainer (full: small, quick: tiny)")
    parser.add_argument("--out", help="also write the JSON result to this file")
    options = parser.parse_args(argv)
    fill_defaults(options, PROFILES["quick" if options.quick else "full"])
    tokenizer = build_arithmetic_chat_tokenizer()
    dataset, _ = make_conversations(options.conversations, options.max_length)
    data_options = SFTDataOptions(max_length=options.max_length + 1, assistant_only_loss=True)
    (tokenized, _), tokenize_seconds = timed(lambda: tokenize_sft_dataset(dataset, tokenizer, data_options))
    packed, pack_seconds = timed(lambda: pack_examples(tokenized, options.max_length, seed=0))
    tokens = int(sum(len(ids) for ids in tokenized["input_ids"]))

    with tempfile.TemporaryDirectory(prefix="easytrain-bench-data-") as scratch:
        arguments = TrainingArguments(
            compilation_cache_dir="",  # no persistent cache: every process compiles cold, as its contender
            output_dir=scratch, model_config=options.model_config, max_length=options.max_length,
            train_batch_size=options.batch_size, max_steps=1_000_000, learning_rate=1e-3, warmup_steps=0,
            eval_strategy="no", save_strategy="no", report_to=["none"], disable_progress_bar=True,
            save_pretrained_at_end=False, validation_split_percentage=0, seed=0)
        trainer = SFTTrainer(arguments, SFTArguments(packing=True, assistant_only_loss=True), tokenizer=tokenizer,
                             dataset_train=dataset)
        trainer.setup()
        loader = trainer.dataloaders.train
        iterator = loader.iterator(0)
        next(iterator)  # start the prefetch threads
        started, batch_tokens = time.perf_counter(), 0
        for _ in range(options.batches):
            batch_tokens += int(np.sum(next(iterator)["attention_mask"]))
        batch_seconds = time.perf_counter() - started
        iterator.close()

        state, step = trainer.state, trainer.functions.train_step
        batch = trainer.to_global(next(iter(loader.iterator(0))))
        state, _ = step(state, batch)  # compile
        for _ in range(2):
            state, _ = step(state, batch)
        jax.block_until_ready(state.params)
        started = time.perf_counter()
        for _ in range(options.train_steps):
            state, _ = step(state, batch)
        jax.block_until_ready(state.params)
        train_tokens_per_second = options.train_steps * int(np.sum(batch["attention_mask"])) / (
            time.perf_counter() - started)

        resume = {}
        for start in RESUME_STEPS:
            seconds = []
            for _ in range(3):
                resumed = loader.iterator(start)
                _, took = timed(lambda: next(resumed))
                resumed.close()
                seconds.append(took)
            resume[str(start)] = round(statistics.median(seconds), 4)

    prepare_rate = tokens / (tokenize_seconds + pack_seconds)
    batch_rate = batch_tokens / batch_seconds
    result = {
        "benchmark": "data_pipeline", "device": jax.devices()[0].device_kind, "cpu_count": os.cpu_count(),
        "profile": "quick" if options.quick else "full", "model_config": options.model_config,
        "conversations": options.conversations, "tokens": tokens, "max_length": options.max_length,
        "packed_rows": len(packed.rows["input_ids"]), "tokenize_tokens_per_second": round(tokens / tokenize_seconds),
        "pack_tokens_per_second": round(tokens / pack_seconds), "prepare_tokens_per_second": round(prepare_rate),
        "batch_tokens_per_second": round(batch_rate), "train_tokens_per_second": round(train_tokens_per_second),
        "prepare_over_train": round(prepare_rate / train_tokens_per_second, 2),
        "batch_over_train": round(batch_rate / train_tokens_per_second, 2),
        "resume_first_batch_seconds": resume, "load_average_1m": round(os.getloadavg()[0], 2),
    }
    print(f"{tokens} tokens in {options.conversations} conversations -> {result['packed_rows']} packed rows")
    print(f"  tokenise {result['tokenize_tokens_per_second']} tok/s, pack {result['pack_tokens_per_second']} tok/s, "
          f"batch {result['batch_tokens_per_second']} tok/s; training consumes {result['train_tokens_per_second']} "
          f"tok/s ({options.model_config})")
    print(f"  preparation / training {result['prepare_over_train']}x, "
          f"batching / training {result['batch_over_train']}x")
    print(f"  resume to first batch (s) by step: {resume}")
    return emit(result, options.out)


if __name__ == "__main__":
    relaunch_like_the_command()
    main()
