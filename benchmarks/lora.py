"""LoRA against full fine-tuning: trainable parameters, optimizer and state bytes, peak memory, step time.

    python -m benchmarks.lora [--quick] [--out FILE] [--lora_rank 16] [--rounds 2]

Two sides, one Llama config (full profile: hidden 768, 8 layers, 12 heads / 4 KV, intermediate 2048,
vocab 32000, untied head: 99.5M parameters, 380 MiB), the same initialisation (seed 0) and batch
(4 x 128 tokens), `SFTTrainer`, AdamW (weight decay 0.01, clipping at 1), float32 throughout:
`full` (`lora_rank=0`) trains every weight; `lora` trains rank-`--lora_rank` adapters on the seven
projections (the default `lora_target_modules`) over the frozen `state.base`.

Each side runs in a child process of its own (`python -m benchmarks.lora --side full|lora`), since
peak resident memory is per process; `--rounds` rounds of (full, lora) alternate, so other load on the
machine reaches both. A child builds its trainer (`setup()`, waited for) and fails loudly unless
training is restricted as configured (LoRA params are only `lora_a`/`lora_b`, numbering
`rank * (in + out)` per adapted kernel of the base; the full side has no base; AdamW's floating-point
state is exactly 2x the params'). It reports `trainable_params`; state bytes (`params`, `opt_state` and
its floating-point part, `base`, `model_state`, `total`); `init_checksum` (the parent checks both sides
start from the same weights); for the trainer's own `functions.train_step`, lowered and compiled on a
fixed batch (random tokens at full length, every position supervised, in the trainer's `collate`
layout, placed once by `to_global`): `compile_seconds`, the executable's `memory_analysis()` (argument,
output, alias, temp bytes; `step_peak_estimate` = argument + output - alias + temp) and
`first_step_seconds`; then, after `--warmup_steps`, `--windows` windows of `--steps` steps (state
donated; a window ends when the device is done): wall and process-CPU seconds per step, tokens/s.
Host memory (on CPU the train state lives there): the peak RSS (`ru_maxrss`) after imports, after
`setup()` and after compiling; then Linux's `VmHWM` is reset (`/proc/self/clear_refs`) and read at the
end: `peak_rss_steps_mib`, the peak of the steps alone; `peak_rss_mib` is the process's peak. Device
memory: `memory_stats()["peak_bytes_in_use"]` (None on CPU, which has no such counter).
The parent reports per side the medians over rounds (of each child's window median for times; min/max
over all windows) and lora / full ratios, prints a table and one JSON line (also written to `--out`).
No timing is asserted anywhere.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from easytrain import TrainingArguments  # noqa: E402
from easytrain.tasks.arithmetic import build_arithmetic_chat_tokenizer, make_arithmetic_chat_splits  # noqa: E402
from easytrain.trainers.sft import SFTArguments, SFTTrainer  # noqa: E402
from benchmarks.report import emit, fill_defaults, relaunch_like_the_command, step_memory  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
LLAMA_100M = dict(hidden_size=768, intermediate_size=2048, num_hidden_layers=8, num_attention_heads=12,
                  num_key_value_heads=4, vocab_size=32000, max_position_embeddings=2048, tie_word_embeddings=False)
LLAMA_TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=512, max_position_embeddings=256, tie_word_embeddings=False)
#: Sizes of one run: the full profile, and `--quick` (a smoke test, under a minute on 2 CPU cores).
PROFILES = {
    "full": dict(model=LLAMA_100M, batch_size=4, max_length=128, steps=2, windows=4, warmup_steps=1, rounds=2),
    "quick": dict(model=LLAMA_TINY, batch_size=2, max_length=32, steps=2, windows=3, warmup_steps=1, rounds=1),
}
SIDES = ("full", "lora")
SIZING = ("batch_size", "max_length", "steps", "windows", "warmup_steps", "lora_rank")
NO_PEAK_REASON = "this backend has no peak-memory counter (Device.memory_stats() is None on CPU); see peak_rss_mib"


def rss_mib() -> float:
    """This process's peak resident memory so far (Linux reports KiB)."""
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def vm_hwm_mib(reset: bool) -> float | None:
    """Linux's VmHWM (peak RSS); `reset`: first lower it to the current RSS (`/proc/self/clear_refs` 5)."""
    try:
        if reset:
            Path("/proc/self/clear_refs").write_text("5")
        status = Path("/proc/self/status").read_text()
    except OSError:
        return None
    peak = next((line.split()[1] for line in status.splitlines() if line.startswith("VmHWM:")), None)
    return None if peak is None else round(int(peak) / 1024, 1)


def tree_bytes(tree: Any, floating: bool | None = None) -> int:
    """Bytes of the leaves of `tree`: all, only floating-point ones (True), or only the others (False)."""
    return int(sum(leaf.nbytes for leaf in jax.tree.leaves(tree)
                   if floating is None or jnp.issubdtype(leaf.dtype, jnp.floating) == floating))


def flat(tree: Any) -> list[tuple[str, Any]]:
    return [(jax.tree_util.keystr(path, simple=True, separator="/"), leaf)
            for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]]


def spread(values: list[float], digits: int = 4) -> dict[str, float]:
    return {"median": round(statistics.median(values), digits), "min": round(min(values), digits),
            "max": round(max(values), digits)}


def build_trainer(options: argparse.Namespace, config: str, output_dir: str, rank: int) -> SFTTrainer:
    """A set-up trainer; its data are a few arithmetic rows (the timed batch is synthetic)."""
    arguments = TrainingArguments(
        compilation_cache_dir="",  # no persistent cache: every process compiles cold, as its contender
        output_dir=output_dir, model_config=config, max_length=options.max_length,
        train_batch_size=options.batch_size, max_steps=1_000_000, learning_rate=1e-4, warmup_steps=0,
        lr_scheduler_type="constant", optimizer="adamw", weight_decay=0.01, max_grad_norm=1.0,
        dtype="float32", param_dtype="float32", eval_strategy="no", save_strategy="no", report_to=["none"],
        disable_progress_bar=True, save_pretrained_at_end=False, validation_split_percentage=0, seed=0,
        lora_rank=rank)
    data = make_arithmetic_chat_splits(4 * options.batch_size, 1, seed=0)["train"]
    trainer = SFTTrainer(arguments, SFTArguments(packing=False), tokenizer=build_arithmetic_chat_tokenizer(),
                         dataset_train=data)
    trainer.setup()
    return trainer


def check_restricted(trainer: SFTTrainer, side: str) -> None:
    """Fail loudly unless exactly the configured variables train."""
    state, args = trainer.state, trainer.arguments
    assert tree_bytes(state.opt_state, True) == 2 * tree_bytes(state.params, True), \
        f"{side}: AdamW's float state should be mu + nu of the params (2x their bytes)"
    if side == "full":
        assert not jax.tree.leaves(state.base), "full fine-tuning has no frozen base"
        return
    names = [path for path, _ in flat(state.params)]
    assert names and all(path.rsplit("/", 1)[-1] in ("lora_a", "lora_b") for path in names), names[:8]
    expected = sum(args.lora_rank * (kernel.shape[0] + kernel.shape[-1]) for path, kernel in flat(state.base)
                   if path.endswith("/kernel") and path.split("/")[-2] in args.lora_target_modules)
    trainable = sum(leaf.size for leaf in jax.tree.leaves(state.params))
    assert trainable == expected, f"lora: {trainable} trainable parameters, the adapted kernels imply {expected}"


def fixed_batch(trainer: SFTTrainer, options: argparse.Namespace, vocab_size: int) -> dict[str, np.ndarray]:
    """Random full-length rows, every position supervised, in the layout and dtypes of the trainer's `collate`."""
    rows, length = options.batch_size, options.max_length
    tokens = np.random.default_rng(0).integers(0, vocab_size, (rows, length + 1))
    values = {"input_ids": tokens[:, :-1], "targets": tokens[:, 1:], "loss_mask": np.ones((rows, length)),
              "segment_ids": np.ones((rows, length)), "attention_mask": np.ones((rows, length)),
              "positions": np.broadcast_to(np.arange(length), (rows, length)), "example_id": np.arange(rows)}
    iterator = trainer.dataloaders.train.iterator(0)
    real = next(iterator)
    iterator.close()
    assert set(real) <= set(values), f"the trainer's batches have fields not filled here: {set(real) - set(values)}"
    return {key: np.ascontiguousarray(values[key], dtype=real[key].dtype) for key in real}


def state_report(state: Any) -> dict[str, int]:
    return {"total": tree_bytes(state), "params": tree_bytes(state.params),
            "params_float": tree_bytes(state.params, True), "opt_state": tree_bytes(state.opt_state),
            "opt_state_float": tree_bytes(state.opt_state, True), "base": tree_bytes(state.base),
            "model_state": tree_bytes(state.model_state)}


def timed_windows(step: Any, state: Any, batch: Any, options: argparse.Namespace) -> tuple[list[float], list[float]]:
    """Wall and process-CPU seconds per step of each window (after `--warmup_steps` untimed steps)."""
    wall, cpu = [], []
    for window in range(-1, options.windows):
        started, cpu_started = time.perf_counter(), time.process_time()
        for _ in range(options.warmup_steps if window < 0 else options.steps):
            state, _ = step(state, batch)
        jax.block_until_ready(state.params)
        if window >= 0:
            wall.append((time.perf_counter() - started) / options.steps)
            cpu.append((time.process_time() - cpu_started) / options.steps)
    return wall, cpu


def run_side(options: argparse.Namespace) -> dict[str, Any]:
    """One side, in this process: build, check, compile, time; what the parent aggregates."""
    result: dict[str, Any] = {"side": options.side, "rss_after_imports_mib": rss_mib(),
                              "load_average_1m": [round(os.getloadavg()[0], 2)]}
    with tempfile.TemporaryDirectory(prefix=f"easytrain-bench-lora-{options.side}-") as scratch:
        started = time.perf_counter()
        trainer = build_trainer(options, options.config, scratch, options.lora_rank if options.side == "lora" else 0)
        state, step = jax.block_until_ready(trainer.state), trainer.functions.train_step  # dispatch is asynchronous
        result.update(setup_seconds=round(time.perf_counter() - started, 2), peak_rss_setup_mib=rss_mib())
        check_restricted(trainer, options.side)
        weights = state.base if options.side == "lora" else state.params  # summed on the device: no host copy
        sums = jax.jit(lambda tree: [jnp.sum(leaf, dtype=jnp.float32) for leaf in jax.tree.leaves(tree)])(weights)
        result.update(init_checksum=sum(float(value) for value in sums), state_bytes=state_report(state),
                      trainable_params=int(sum(leaf.size for leaf in jax.tree.leaves(state.params))))
        batch = trainer.to_global(fixed_batch(trainer, options, int(trainer.model_config.vocab_size)))
        started = time.perf_counter()
        result["train_step_memory"] = step_memory(step.lower(state, batch).compile())
        result["compile_seconds"] = round(time.perf_counter() - started, 2)
        # From here on the peak is the steps' (Linux resets getrusage's ru_maxrss with VmHWM).
        result.update(peak_rss_before_steps_mib=rss_mib(), rss_before_steps_mib=vm_hwm_mib(reset=True))
        started = time.perf_counter()
        state, _ = step(state, batch)
        jax.block_until_ready(state.params)
        result["first_step_seconds"] = round(time.perf_counter() - started, 2)
        result["step_seconds"], result["step_cpu_seconds"] = timed_windows(step, state, batch, options)
    stats = jax.devices()[0].memory_stats()
    steps_peak = vm_hwm_mib(reset=False)
    peak = max(result["peak_rss_before_steps_mib"], rss_mib(), steps_peak or 0)  # rss_mib(): if VmHWM is missing
    result.update(peak_rss_steps_mib=steps_peak, peak_rss_mib=peak,
                  device_peak_bytes=stats.get("peak_bytes_in_use") if stats else None)
    result["load_average_1m"].append(round(os.getloadavg()[0], 2))
    return result


def run_rounds(options: argparse.Namespace) -> tuple[dict[str, Any], dict[str, list[dict[str, Any]]]]:
    """The model config, and each side's child results, round by round: full, lora, full, lora, ..."""
    children: dict[str, list[dict[str, Any]]] = {side: [] for side in SIDES}
    with tempfile.TemporaryDirectory(prefix="easytrain-bench-lora-") as scratch:
        config = options.model_config or str(Path(scratch) / "config.json")
        if not options.model_config:
            Path(config).write_text(json.dumps(options.model))
        for index in range(options.rounds):
            for side in SIDES:
                out = Path(scratch) / f"{index}-{side}.json"
                subprocess.run([sys.executable, "-m", "benchmarks.lora", "--side", side, "--config", config,
                                "--result", str(out), *(f"--{key}={getattr(options, key)}" for key in SIZING)],
                               cwd=ROOT, check=True)
                children[side].append(json.loads(out.read_text()))
        return json.loads(Path(config).read_text()), children


def median_of(children: list[dict[str, Any]], key: str) -> float | None:
    values = [child[key] for child in children]
    return None if None in values else round(statistics.median(values), 1 if key.endswith("_mib") else 2)


def window_spread(children: list[dict[str, Any]], key: str, digits: int | None = 4) -> dict[str, float]:
    """The median of the children's window medians of `key`, and the min and max of all their windows; `digits=None`
    leaves them unrounded, for ratios (a 0.3 ms step rounded to 4 decimals is 7% off)."""
    out = {"median": statistics.median(statistics.median(c[key]) for c in children),
           "min": min(min(c[key]) for c in children), "max": max(max(c[key]) for c in children)}
    return out if digits is None else {name: round(value, digits) for name, value in out.items()}


def aggregate(children: list[dict[str, Any]], tokens: int) -> dict[str, Any]:
    """One side over its rounds: medians of per-child numbers (of window medians for times), min/max of all windows."""
    first = children[0]
    assert all(c["trainable_params"] == first["trainable_params"] for c in children)
    windows = functools.partial(window_spread, children)
    peak = median_of(children, "device_peak_bytes")
    return {"trainable_params": first["trainable_params"], "state_bytes": first["state_bytes"],
            "train_step_memory": first["train_step_memory"], "step_seconds": windows("step_seconds"),
            "step_cpu_seconds": windows("step_cpu_seconds"),
            "tokens_per_second": round(tokens / windows("step_seconds")["median"], 1),
            "peak_rss_mib": spread([c["peak_rss_mib"] for c in children], 1),
            **{key: median_of(children, key) for key in (
                "peak_rss_steps_mib", "rss_after_imports_mib", "peak_rss_setup_mib", "peak_rss_before_steps_mib",
                "rss_before_steps_mib",
                "setup_seconds", "compile_seconds", "first_step_seconds")},
            "device_peak_bytes": None if peak is None else int(peak),
            "device_peak_note": NO_PEAK_REASON if peak is None else None,
            "load_average_1m": [c["load_average_1m"] for c in children]}


def ratios(sides: dict[str, dict[str, Any]], children: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    """lora / full of each number (None where one is missing); step time also per round (children run in pairs)."""
    paths = {"step_seconds_of_medians": ("step_seconds", "median"), "step_seconds_of_minimums": ("step_seconds", "min"),
             "step_cpu_seconds_of_medians": ("step_cpu_seconds", "median"), "peak_rss": ("peak_rss_mib", "median"),
             "peak_rss_steps": ("peak_rss_steps_mib",), "trainable_params": ("trainable_params",),
             "opt_state_bytes": ("state_bytes", "opt_state"), "state_bytes": ("state_bytes", "total"),
             "step_peak_estimate": ("train_step_memory", "step_peak_estimate")}
    unrounded = {side: {**sides[side], **{key: window_spread(children[side], key, digits=None)
                                          for key in ("step_seconds", "step_cpu_seconds")}} for side in sides}
    out = {}
    for name, path in paths.items():
        lora, full = (functools.reduce(lambda d, k: (d or {}).get(k), path, unrounded[side])
                      for side in ("lora", "full"))
        out[name] = round(lora / full, 4) if lora is not None and full else None
    step = lambda child: statistics.median(child["step_seconds"])
    out["step_seconds_per_round"] = spread([step(b) / step(a) for a, b in zip(children["full"], children["lora"])])
    return out


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny model, 2 x 32 tokens (a smoke test)")
    parser.add_argument("--out", help="also write the JSON result to this file")
    parser.add_argument("--model_config", help="a config.json (default: the profile's Llama)")
    parser.add_argument("--lora_rank", type=int, default=16, help="adapter rank of the lora side")
    for name, help_text in (("batch_size", "rows per step"), ("max_length", "positions per row"),
                            ("steps", "steps per timed window"), ("windows", "timed windows per child"),
                            ("warmup_steps", "untimed steps after the first"),
                            ("rounds", "rounds of (full, lora) child processes")):
        parser.add_argument(f"--{name}", type=int, help=f"{help_text} (default: from the profile)")
    parser.add_argument("--side", choices=SIDES, help=argparse.SUPPRESS)  # a child process: run this side only
    parser.add_argument("--config", help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    options = parser.parse_args(argv)
    options.profile = "quick" if options.quick else "full"
    fill_defaults(options, PROFILES[options.profile])
    return options


def main(argv: list[str] | None = None) -> dict[str, Any] | None:
    options = parse(argv)
    if options.side:
        Path(options.result).write_text(json.dumps(run_side(options)))
        return None
    started, load_at_start = time.perf_counter(), os.getloadavg()[0]
    model, children = run_rounds(options)
    tokens = options.batch_size * options.max_length
    sides = {side: aggregate(children[side], tokens) for side in SIDES}
    checksums = {c["init_checksum"] for side in SIDES for c in children[side]}
    assert len(checksums) == 1, f"the sides did not start from the same weights: {checksums}"
    base = sides["lora"]["state_bytes"]["base"]
    assert base == sides["full"]["state_bytes"]["params"], "the LoRA base should be the full side's params"
    device = jax.devices()[0]
    result = {
        "benchmark": "lora_vs_full_fine_tuning", "device": device.device_kind, "platform": device.platform,
        "cpu_count": os.cpu_count(), "jax": jax.__version__, "profile": options.profile, "model": model,
        "params": sides["full"]["trainable_params"], "weights_mib": round(base / 2**20, 1),
        "lora_rank": options.lora_rank, "lora_targets": "q, k, v, o, gate, up, down projections",
        "optimizer": "adamw", "dtype": "float32", "batch_size": options.batch_size, "max_length": options.max_length,
        "tokens_per_step": tokens, "steps_per_window": options.steps, "windows": options.windows,
        "rounds": options.rounds, "sides": sides, "lora_over_full": ratios(sides, children),
        "total_seconds": round(time.perf_counter() - started, 1),
        "load_average_1m": [round(load_at_start, 2), round(os.getloadavg()[0], 2)],  # other work on the machine
    }
    print_table(result)
    return emit(result, options.out)


def print_table(result: dict[str, Any]) -> None:
    sides, ratio = result["sides"], result["lora_over_full"]
    mib = lambda value: "null" if value is None else f"{value / 2**20:.1f}"
    times = lambda s: f"{s['median']} [{s['min']}, {s['max']}]"
    both = lambda label, cell, ratio_key=None: (label, *(cell(sides[side]) for side in SIDES),
                                                "" if ratio_key is None else str(ratio[ratio_key]))
    step_mib = lambda key: lambda s: mib((s["train_step_memory"] or {}).get(key))
    rows = [("", *SIDES, "lora / full"),
            both("trainable params", lambda s: str(s["trainable_params"]), "trainable_params"),
            both("state total MiB", lambda s: mib(s["state_bytes"]["total"]), "state_bytes"),
            both("  params MiB", lambda s: mib(s["state_bytes"]["params"])),
            both("  optimizer MiB", lambda s: mib(s["state_bytes"]["opt_state"]), "opt_state_bytes"),
            both("  frozen base MiB", lambda s: mib(s["state_bytes"]["base"])),
            *(both(f"step {key} MiB", step_mib(key)) for key in ("argument", "output", "alias", "temp")),
            both("step peak estimate MiB", step_mib("step_peak_estimate"), "step_peak_estimate"),
            both("peak RSS MiB (process)", lambda s: str(s["peak_rss_mib"]["median"]), "peak_rss"),
            both("peak RSS MiB (steps only)", lambda s: str(s["peak_rss_steps_mib"]), "peak_rss_steps"),
            both("peak RSS MiB (to setup / to compile)", lambda s: f"{s['peak_rss_setup_mib']} / "
                 f"{s['peak_rss_before_steps_mib']}"),
            both("RSS MiB after imports / before steps", lambda s: f"{s['rss_after_imports_mib']} / "
                 f"{s['rss_before_steps_mib']}"),
            both("device peak MiB", lambda s: mib(s["device_peak_bytes"])),
            both("s/step wall (median [min, max])", lambda s: times(s["step_seconds"]), "step_seconds_of_medians"),
            ("  lora / full per round", "", "", times(ratio["step_seconds_per_round"])),
            both("s/step CPU (median [min, max])", lambda s: times(s["step_cpu_seconds"]),
                 "step_cpu_seconds_of_medians"),
            both("tokens/s", lambda s: str(s["tokens_per_second"])),
            both("setup / compile / first step s", lambda s: f"{s['setup_seconds']} / {s['compile_seconds']} / "
                 f"{s['first_step_seconds']}")]
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    for row in rows:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths)))
    if sides["full"]["device_peak_note"]:
        print(f"device peak: null. {sides['full']['device_peak_note']}")


if __name__ == "__main__":
    relaunch_like_the_command()
    main()
