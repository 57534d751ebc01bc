"""Train the largest Llama-style model that fits one accelerator in bfloat16: tokens/s and MFU.

    python -m benchmarks.gpu [--config llama-3b] [--steps 10] [--warmup 3] [--batch 4] [--length 2048]
                             [--remat full|dots|none] [--param_dtype float32] [--padding 0.25] [--quick]
                             [--setup_only] [--out FILE] [--FIELD VALUE ...]

Without `--config`, the largest of `CONFIGS` (Llama 3.x shapes: 128k vocabulary, grouped-query attention)
whose estimated training memory fits `memory_stats()['bytes_limit']` of the first device is trained; a
device that reports no limit (a CPU) needs `--config`. The run goes through `BaseTrainer` itself: model
initialised in place on the device, AdamW, compute in bfloat16 with `--param_dtype` master weights and
optimizer moments, synthetic token blocks. Tokens/s and MFU are the trainer's own (`easytrain.throughput`,
FLOPs from `easytrain.flops`, peak from its table or a measured CPU matmul rate), logged every step; the
first `--warmup` steps (compilation included) are left out. `--padding F` ends each row in padding, a mean
fraction F of its slots (`attention_mask` 0, no loss; real lengths from 1 - 2F to all of the row): with
`--attention_implementation dot_product_attention` on a CUDA GPU that is cuDNN's key-length path, one
`lax.cond` per layer (`easytrain.models.masks`), to compare against the unpadded run; tokens/s and MFU count
every slot, `padding_efficiency` the real share. `setup_seconds` is the trainer's construction: the
state initialised in place (compiling and running its initialisation program) before any step; `--setup_only` stops
there. Any other `--FIELD VALUE` is passed on to
`TrainingArguments` (e.g. `--attention_implementation`, `--scan_layers`, `--loss_chunk_size` where this
version has those fields; an unknown field is an error before anything is built). `--quick`: a tiny model
on any device, in seconds. With `--profile_steps N` (passed on), the result also holds the traced steps' kernel
time by XLA op (`benchmarks.trace_summary`): where the device's time goes. Prints one JSON line. No timing is
asserted anywhere.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import datasets  # noqa: E402
import jax  # noqa: E402
import numpy as np  # noqa: E402
import transformers  # noqa: E402

from easytrain import BaseTrainer, Callback  # noqa: E402
from easytrain.config_io import parse_arguments  # noqa: E402
from easytrain.data.lm import lm_collate_rows  # noqa: E402
from easytrain.errors import ArgumentError  # noqa: E402
from easytrain.flops import hardware_peak, matmul_params  # noqa: E402
from easytrain.tasks import build_arithmetic_tokenizer  # noqa: E402
from benchmarks.report import emit, relaunch_like_the_command, scratch_dir  # noqa: E402
from benchmarks.trace_summary import summarize  # noqa: E402

LLAMA3 = dict(vocab_size=128256, num_key_value_heads=8, rope_theta=500000.0, max_position_embeddings=8192)
#: Candidates, smallest first (Llama 3.2 1B / 3B and Llama 3.1 8B shapes; 'tiny' for --quick).
CONFIGS: dict[str, dict[str, Any]] = {
    "tiny": dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, max_position_embeddings=256),
    "llama-1b": dict(LLAMA3, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                     tie_word_embeddings=True),
    "llama-3b": dict(LLAMA3, hidden_size=3072, intermediate_size=8192, num_hidden_layers=28, num_attention_heads=24,
                     tie_word_embeddings=True),
    "llama-8b": dict(LLAMA3, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                     tie_word_embeddings=False),
}
DTYPE_BYTES = {"float32": 4, "bfloat16": 2}
HEADROOM = 1.15  # XLA scratch, fragmentation and what the estimate leaves out
QUICK = dict(config="tiny", steps=2, warmup=1, batch=2, length=32)
DEFAULTS = dict(config=None, steps=10, warmup=3, batch=4, length=2048)


def parameter_count(config: transformers.LlamaConfig) -> int:
    """All weights: the matmul ones, the input embedding when untied, and the norm scales."""
    untied = 0 if config.tie_word_embeddings else config.vocab_size * config.hidden_size
    return matmul_params(config) + untied + (2 * config.num_hidden_layers + 1) * config.hidden_size


def estimated_bytes(config: transformers.LlamaConfig, *, batch: int, length: int, param_dtype: str,
                    remat: str) -> int:
    """Rough peak device memory of one training step, deliberately on the generous side.

    State: parameters, gradients and two AdamW moments in `param_dtype`, plus the bfloat16 copies the
    step computes with. Activations (bfloat16, attention scores and logits float32): one layer's working
    set, what each layer keeps for the backward pass (its input only under remat 'full'), and the logits
    with their softmax and gradient.
    """
    params, tokens = parameter_count(config), batch * length
    state = params * (4 * DTYPE_BYTES[param_dtype] + 2)
    width, inner, heads = config.hidden_size, config.intermediate_size, config.num_attention_heads
    layer = tokens * (8 * width + 3 * inner) * 2 + 2 * batch * heads * length * length * 4
    kept = {"full": tokens * width * 2, "dots": tokens * (6 * width + 2 * inner) * 2}.get(remat, layer)
    logits = 3 * tokens * config.vocab_size * 4
    return int(HEADROOM * (state + layer + config.num_hidden_layers * kept + logits))


def llama(name: str) -> transformers.LlamaConfig:
    return transformers.LlamaConfig(**CONFIGS[name])


def pick_config(bytes_limit: int | None, **sizes: Any) -> str:
    """The largest candidate (not 'tiny') whose estimate fits `bytes_limit`."""
    if bytes_limit is None:
        raise ArgumentError("config", "the device reports no memory limit (a CPU?); pass --config "
                                      f"({', '.join(CONFIGS)}) or --quick.")
    fitting = [name for name in CONFIGS if name != "tiny" and estimated_bytes(llama(name), **sizes) <= bytes_limit]
    if not fitting:
        raise ArgumentError("config", f"none of {', '.join(CONFIGS)} fits {bytes_limit / 2**30:.1f} GiB at this "
                                      "batch and length; lower --batch or --length, or pass --remat full.")
    return fitting[-1]


def parse(argv: list[str] | None) -> tuple[argparse.Namespace, list[str]]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                     allow_abbrev=False)
    parser.add_argument("--config", choices=list(CONFIGS), help="default: the largest that fits the device")
    for name in ("steps", "warmup", "batch", "length"):
        parser.add_argument(f"--{name}", type=int, help=f"default {DEFAULTS[name]} (--quick: {QUICK[name]})")
    parser.add_argument("--remat", default="full", choices=["none", "full", "dots"], help="remat_policy")
    parser.add_argument("--param_dtype", default="float32", choices=list(DTYPE_BYTES),
                        help="master weights and optimizer moments")
    parser.add_argument("--padding", type=float, default=0.0,
                        help="mean fraction of each row that is trailing padding (0 to 0.5; default none)")
    parser.add_argument("--quick", action="store_true", help="a tiny model, a few steps: a smoke run")
    parser.add_argument("--setup_only", action="store_true",
                        help="build the trainer (state initialised on the device) and report its time; no step")
    parser.add_argument("--out", help="also write the JSON result to this file")
    options, extra = parser.parse_known_args(argv)
    for key, value in (QUICK if options.quick else DEFAULTS).items():
        if getattr(options, key) is None:
            setattr(options, key, value)
    for name in ("steps", "warmup", "batch", "length"):
        if getattr(options, name) < (0 if name == "warmup" else 1):
            parser.error(f"--{name} must be positive, got {getattr(options, name)}")
    if not 0 <= options.padding <= 0.5:
        parser.error(f"--padding is a mean fraction of each row, from 0 to 0.5; got {options.padding}")
    return options, extra


def training_arguments(options: argparse.Namespace, extra: list[str], output_dir: str) -> Any:
    """`TrainingArguments` of the run; `extra` flags go through the library's own parser (types, checks)."""
    ours = dict(output_dir=output_dir, dtype="bfloat16", param_dtype=options.param_dtype, remat_policy=options.remat,
                max_length=options.length, train_batch_size=options.batch, max_steps=options.warmup + options.steps,
                learning_rate=1e-4, lr_scheduler_type="constant", warmup_steps=0, logging_steps=1,
                eval_strategy="no", save_strategy="no", report_to=["none"], disable_progress_bar=True,
                save_pretrained_at_end=False, validation_split_percentage=0, model_config=str(Path(output_dir) /
                                                                                             "config.json"),
                compilation_cache_dir="")  # the first step compiles cold (no persistent cache)
    argv = [item for key, value in ours.items() for item in
            (f"--{key}", *(map(str, value) if isinstance(value, list) else [str(value)]))]
    try:
        return parse_arguments(argv + extra)
    except ArgumentError as error:
        raise ArgumentError(error.field, f"{error.message} (benchmarks.gpu passes flags it does not know on to "
                                         "TrainingArguments)") from None


def trailing_padding(batch: dict[str, np.ndarray], example_ids: np.ndarray, fraction: float) -> dict[str, np.ndarray]:
    """`batch` with each row ending in padding, a mean `fraction` of its slots (drawn per batch from its
    example ids): `attention_mask` 0 and no loss after the row's real tokens."""
    length = batch["input_ids"].shape[1]
    draw_N = np.random.default_rng(np.abs(example_ids).tolist()).uniform(0.0, 2 * fraction, len(example_ids))
    real_N = np.maximum(1, np.round(length * (1 - draw_N))).astype(np.int32)
    mask_NT = (np.arange(length)[None, :] < real_N[:, None]).astype(np.int32)
    return {**batch, "attention_mask": mask_NT, "loss_mask": batch["loss_mask"] * mask_NT}


class TrailingPadding(BaseTrainer):
    """The benchmark's trainer with `--padding`: token blocks whose rows end in padding."""

    def __init__(self, *args: Any, fraction: float, **kwargs: Any):
        self.fraction = fraction
        super().__init__(*args, **kwargs)

    def collate(self, rows: Any, example_ids: np.ndarray) -> dict[str, np.ndarray]:
        return trailing_padding(lm_collate_rows(rows, example_ids), example_ids, self.fraction)


class Record(Callback):
    def __init__(self) -> None:
        self.logs: list[dict[str, float]] = []

    def on_log(self, trainer, step, logs):
        self.logs.append({"step": step, **logs})


def spread(values: list[float]) -> dict[str, float] | None:
    if not values:
        return None
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    options, extra = parse(argv)
    device = jax.devices()[0]
    limit = (device.memory_stats() or {}).get("bytes_limit")
    sizes = dict(batch=options.batch, length=options.length, param_dtype=options.param_dtype, remat=options.remat)
    name = options.config or pick_config(limit, **sizes)
    config = llama(name)
    if options.length > config.max_position_embeddings:
        raise ArgumentError("length", f"{name} has max_position_embeddings {config.max_position_embeddings}; "
                                      f"pass --length at most that.")
    output_dir = scratch_dir("easytrain-gpu-")
    config.to_json_file(str(Path(output_dir) / "config.json"))
    arguments = training_arguments(options, extra, output_dir)
    rows = options.batch * (options.warmup + options.steps)
    blocks = np.random.default_rng(0).integers(0, config.vocab_size, (rows, options.length + 1), dtype=np.int32)
    record = Record()
    started = time.perf_counter()
    padded = dict(fraction=options.padding) if options.padding else {}
    trainer = (TrailingPadding if padded else BaseTrainer)(
        arguments, tokenizer=build_arithmetic_tokenizer(), callbacks=[record],
        dataset_train=datasets.Dataset.from_dict({"input_ids": blocks}), **padded)
    jax.block_until_ready(trainer.state)
    setup = time.perf_counter() - started
    started = time.perf_counter()
    if not options.setup_only:
        trainer.train()
    wall = time.perf_counter() - started
    measured = [log for log in record.logs if log["step"] > options.warmup]
    tokens = [log["tokens_per_second"] for log in measured]
    seconds = sum(log["step_time"] for log in measured)
    peak = hardware_peak()
    stats = device.memory_stats() or {}
    result = {
        "benchmark": "gpu", "device_kind": device.device_kind, "platform": device.platform,
        "device_count": jax.device_count(), "config": name, "chosen": "flag" if options.config else "largest that fits",
        "parameters": parameter_count(config), "estimated_bytes": estimated_bytes(config, **sizes),
        # XLA's own plan of the compiled step (easytrain.memory_plan), to check the estimate against
        "planned_mib": record.logs[0].get("planned_memory_mib") if record.logs else None,
        "bytes_limit": limit, "peak_bytes_in_use": stats.get("peak_bytes_in_use"), "batch": options.batch,
        "length": options.length, "tokens_per_step": options.batch * options.length, "remat": options.remat,
        "dtype": "bfloat16", "param_dtype": options.param_dtype, "warmup_steps": options.warmup,
        "measured_steps": len(measured),
        "compile_seconds": record.logs[0].get("compile_seconds") if record.logs else None,
        "tokens_per_second": spread(tokens),
        "tokens_per_second_overall": options.batch * options.length * len(measured) / seconds if seconds else None,
        "mfu": spread([log["mfu"] for log in measured if "mfu" in log]), "padding": options.padding,
        "padding_efficiency": spread([log["padding_efficiency"] for log in measured if "padding_efficiency" in log]),
        "peak_flops_per_second": peak.flops_per_second if peak else None, "peak_source": peak.source if peak else None,
        "setup_seconds": setup, "setup_only": options.setup_only,
        "final_loss": record.logs[-1].get("loss") if record.logs else None, "wall_seconds": wall,
        "extra_arguments": extra, "jax": jax.__version__, "xla_flags": os.environ.get("XLA_FLAGS", ""),
        "threefry_gpu_kernel_lowering": jax.config.jax_threefry_gpu_kernel_lowering,
    }
    if arguments.profile_steps and not options.setup_only:
        result["trace"] = traced_kernels(Path(output_dir) / "tensorboard")
    return emit(result, options.out)


def traced_kernels(directory: Path) -> dict[str, Any]:
    """`--profile_steps`: the traced steps' kernel time by XLA op (`benchmarks.trace_summary`), or why not."""
    try:
        return summarize(directory, top=30)
    except Exception as error:  # the measurement stands without it
        return {"error": f"{type(error).__name__}: {error}"}


if __name__ == "__main__":
    relaunch_like_the_command()
    main()
