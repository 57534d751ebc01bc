"""easytrain against the PyTorch peer: the same Llama trained by `transformers.Trainer`, a raw PyTorch loop,
easytrain's `BaseTrainer` (default `compiler_options='auto'`) and a plain jitted NNX step with the same XLA
options, in interleaved child processes.

    python -m benchmarks.versus_torch [--quick] [--rounds 5] [--windows 3] [--window_steps 4] [--out FILE]

Same architecture (vocab 4096, hidden 256, 4 layers, 4 heads, SwiGLU 1024), batch 8 x 256 tokens, AdamW
(lr 3e-4, weight decay 0.01, constant schedule, no clipping), float32, random token blocks. Each round
starts one child process per contender, in an order that rotates between rounds, so all of them see the
same machine; a child warms up (`--warmup` steps, compilation included), then times `--windows` windows of
`--window_steps` steps, synchronising only at window ends (as a trainer does per logging window).
Reported per contender: tokens/s (median over every window of every round, with min and max), tokens per
CPU-second of the process (steadier on a shared machine, but blind to how well each side uses the cores), the
first step measured alike on every side (`first_step_ready_seconds`: from its start until step 1's results are
ready, a JAX side's trace, compile and launch included; `first_step_over_median_seconds`: that minus the median
timed step, EasyDeL's "compile"; `trace_compile_seconds`: trace + compile + launch alone, JAX sides only), peak
RSS, and CPU MFU: model FLOP/s (6 N per token plus attention, `easytrain.flops`) over the best float32 matmul rate
measured here by JAX and by PyTorch. Ratios compare medians. Round by round: each contender's median tokens/s and
tokens per CPU-second, its minor page faults, kernel CPU milliseconds, the machine's stolen CPU milliseconds
and its threads' CPU milliseconds by thread name, per timed step (`per_round*`), and the pairs' ratios
(`round_ratios`), to tell a round that one side ran slow in from a slower step, and the compute threads' CPU from
what its other threads take from them. Prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import time
from typing import Any, Callable

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import numpy as np  # noqa: E402

from benchmarks import thread_times  # noqa: E402
from benchmarks.report import child_json, emit, relaunch_like_the_command, scratch_dir  # noqa: E402

CONFIG = dict(vocab_size=4096, hidden_size=256, intermediate_size=1024, num_hidden_layers=4,
              num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=2048)
BATCH, LENGTH, LR, WD = 8, 256, 3e-4, 0.01
CONTENDERS = ("hf_trainer", "torch_loop", "easytrain", "nnx_step")
QUICK = dict(config=dict(vocab_size=256, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=2), batch=2, length=16)


def token_blocks(vocab: int, batch: int, length: int, rows_per_batch: int = 16) -> np.ndarray:
    """`batch * rows_per_batch` random rows of `length + 1` tokens (inputs and shifted targets)."""
    return np.random.default_rng(0).integers(0, vocab, (batch * rows_per_batch, length + 1)).astype(np.int32)


def stolen_seconds() -> float:
    """CPU time the hypervisor gave other guests while this one wanted it, all CPUs together, since boot (the
    `steal` column of Linux's /proc/stat); 0.0 where there is no such file."""
    try:
        with open("/proc/stat") as stat:
            fields = stat.readline().split()
    except OSError:
        return 0.0
    return int(fields[8]) / os.sysconf("SC_CLK_TCK") if len(fields) > 8 and fields[0] == "cpu" else 0.0


class Windows:
    """Wall time of consecutive windows of steps; `sync` waits for the device before each reading. Also, over
    them all, the process's minor page faults and kernel CPU time and the machine's stolen CPU time: what tells
    a round that one contender ran slow in from its step getting slower (memory, or the hypervisor)."""

    def __init__(self, sync: Callable[[], None]):
        self.sync, self.seconds, self.cpu_seconds, self.mark, self.cpu_mark = sync, [], [], 0.0, 0.0
        self.usage_at_start, self.stolen_at_start = resource.getrusage(resource.RUSAGE_SELF), stolen_seconds()
        self.threads_at_start = thread_times.snapshot()

    def start(self) -> None:
        self.sync()
        self.mark, self.cpu_mark = time.perf_counter(), time.process_time()
        self.usage_at_start, self.stolen_at_start = resource.getrusage(resource.RUSAGE_SELF), stolen_seconds()
        self.threads_at_start = thread_times.snapshot()

    def lap(self) -> None:
        self.sync()
        now, cpu_now = time.perf_counter(), time.process_time()
        self.seconds.append(now - self.mark)
        self.cpu_seconds.append(cpu_now - self.cpu_mark)
        self.mark, self.cpu_mark = now, cpu_now

    def result(self, first_step_ready_seconds: float, trace_compile_seconds: float | None = None,
               **details: Any) -> dict[str, Any]:
        """`first_step_ready_seconds`: step 1 from its start until its results are ready (every side alike);
        `trace_compile_seconds`: the part before it runs, where a JAX side can time it (None for PyTorch)."""
        usage = resource.getrusage(resource.RUSAGE_SELF)  # the last `lap` has synchronised
        return {"window_seconds": self.seconds, "window_cpu_seconds": self.cpu_seconds,
                "timed_minor_faults": usage.ru_minflt - self.usage_at_start.ru_minflt,
                "timed_system_seconds": usage.ru_stime - self.usage_at_start.ru_stime,
                "timed_stolen_seconds": stolen_seconds() - self.stolen_at_start,
                "timed_thread_seconds": thread_times.by_name(self.threads_at_start, thread_times.snapshot()),
                "first_step_ready_seconds": first_step_ready_seconds, "trace_compile_seconds": trace_compile_seconds,
                "details": details}


# ---------------------------------------------------------------------------------------------- PyTorch
def torch_model(config: dict):
    import torch
    import transformers

    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(**config)).float()


def run_hf_trainer(config: dict, blocks: np.ndarray, batch: int, warmup: int, windows: int, every: int) -> dict:
    """`transformers.Trainer` with its defaults except what the comparison fixes (no eval, saves, logs)."""
    import torch
    import transformers

    rows = [{"input_ids": torch.from_numpy(row[:-1].astype(np.int64)),
             "labels": torch.from_numpy(row[:-1].astype(np.int64))} for row in blocks]
    timer = Windows(sync=lambda: None)
    first: list[float] = []

    class Timing(transformers.TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            if state.global_step == 0:
                first.append(time.perf_counter())

        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == 1:
                first[0] = time.perf_counter() - first[0]
            if state.global_step == warmup:
                timer.start()
            elif state.global_step > warmup and (state.global_step - warmup) % every == 0:
                timer.lap()

    arguments = transformers.TrainingArguments(
        output_dir=scratch_dir("hf-bench-"), per_device_train_batch_size=batch,
        max_steps=warmup + windows * every, learning_rate=LR, weight_decay=WD, lr_scheduler_type="constant",
        max_grad_norm=0.0, logging_strategy="no", save_strategy="no", eval_strategy="no", report_to=[],
        use_cpu=True, dataloader_num_workers=0, disable_tqdm=True, seed=0)
    trainer = transformers.Trainer(model=torch_model(config), args=arguments, train_dataset=rows,
                                   callbacks=[Timing()])
    trainer.train()
    return timer.result(first[0], optim=str(arguments.optim), attention=trainer.model.config._attn_implementation,
                        torch_threads=torch.get_num_threads())


def run_torch_loop(config: dict, blocks: np.ndarray, batch: int, warmup: int, windows: int, every: int) -> dict:
    """The same model and AdamW (PyTorch's default implementation) in a bare eager loop."""
    import torch

    model = torch_model(config).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=WD)
    data = torch.from_numpy(blocks[:, :-1].astype(np.int64))
    order = np.random.default_rng(0).permutation(len(blocks))
    timer = Windows(sync=lambda: None)
    started = time.perf_counter()
    first = 0.0
    for step in range(warmup + windows * every):
        rows = data[order[np.arange(step * batch, (step + 1) * batch) % len(blocks)]]
        model(input_ids=rows, labels=rows).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if step == 0:
            first = time.perf_counter() - started
        if step + 1 == warmup:
            timer.start()
        elif step + 1 > warmup and (step + 1 - warmup) % every == 0:
            timer.lap()
    return timer.result(first, torch_threads=torch.get_num_threads())


# ---------------------------------------------------------------------------------------------- JAX
def run_easytrain(config: dict, blocks: np.ndarray, batch: int, warmup: int, windows: int, every: int) -> dict:
    """`BaseTrainer` with logging every window (its own sync point), no eval, no checkpoints. Its first step runs
    from `on_train_begin` (the peak FLOP/s measured before: not part of a step) until step 1's parameters are ready:
    the first batch drawn and placed, the step traced, compiled, launched and run."""
    import datasets
    import jax
    import transformers

    from easytrain import BaseTrainer, Callback, TrainingArguments, flops
    from easytrain.models import init_model
    from easytrain.tasks import build_arithmetic_tokenizer

    timer = Windows(sync=lambda: None)
    first: list[float] = []

    class Timing(Callback):
        def on_train_begin(self, trainer):
            flops.hardware_peak()  # cached: the loop's own call before step 1 then costs nothing
            first.append(time.perf_counter())

        def on_step_end(self, trainer, step):
            timer.sync = lambda: jax.block_until_ready(trainer.state.params)
            if step == 1:
                timer.sync()
                first[0] = time.perf_counter() - first[0]
            if step == warmup:
                timer.start()
            elif step > warmup and (step - warmup) % every == 0:
                timer.lap()

    arguments = TrainingArguments(
        compilation_cache_dir="",  # no persistent cache: every process compiles cold, as its contender
        output_dir=scratch_dir("easytrain-bench-"), max_length=blocks.shape[1] - 1,
        train_batch_size=batch, max_steps=warmup + windows * every, learning_rate=LR, weight_decay=WD,
        lr_scheduler_type="constant", max_grad_norm=0.0, logging_steps=every, eval_strategy="no",
        save_strategy="no", report_to=["none"], disable_progress_bar=True, save_pretrained_at_end=False,
        validation_split_percentage=0)
    trainer = BaseTrainer(arguments, model=init_model(transformers.LlamaConfig(**config), seed=0),
                          tokenizer=build_arithmetic_tokenizer(),
                          dataset_train=datasets.Dataset.from_dict({"input_ids": blocks}), callbacks=[Timing()])
    trainer.setup()
    trainer.train()
    return timer.result(first[0], trainer.loop.compile_seconds)


def run_nnx_step(config: dict, blocks: np.ndarray, batch: int, warmup: int, windows: int, every: int) -> dict:
    """The minimal hand-written jitted NNX step of `benchmarks.overhead` on the same model, compiled with
    easytrain's XLA options (`compiler_options='auto'`), so easytrain against it is the trainer's own cost. Its
    first step: lower + compile, then step 1 run until its loss is on the host."""
    import transformers

    from benchmarks import overhead

    run, compile_seconds = overhead.hand_written_loop(transformers.LlamaConfig(**config), blocks, seed=0,
                                                      batch=batch)
    timer = Windows(sync=lambda: None)  # `run` returns a float loss: it has synchronised already
    started = time.perf_counter()
    run(1)
    first_step = compile_seconds + time.perf_counter() - started
    if warmup > 1:
        run(warmup - 1)
    timer.start()
    for _ in range(windows):
        run(every)
        timer.lap()
    return timer.result(first_step, compile_seconds)


RUNNERS = {"hf_trainer": run_hf_trainer, "torch_loop": run_torch_loop, "easytrain": run_easytrain,
           "nnx_step": run_nnx_step}


# ---------------------------------------------------------------------------------------------- parent
def best_matmul_flops() -> dict[str, float]:
    """The float32 1024 x 1024 matmul rate of JAX and of PyTorch on this machine (best of a few runs)."""
    import torch

    from easytrain.flops import measured_cpu_matmul_flops

    a = torch.randn(1024, 1024)
    seconds = []
    for _ in range(6):
        started = time.perf_counter()
        a @ a
        seconds.append(time.perf_counter() - started)
    return {"jax": measured_cpu_matmul_flops(), "torch": 2 * 1024**3 / min(seconds[1:])}


def run_child(contender: str, options: argparse.Namespace) -> dict[str, Any]:
    return child_json("benchmarks.versus_torch", "--child", contender, "--warmup", str(options.warmup),
                      "--windows", str(options.windows), "--window_steps", str(options.window_steps),
                      *(["--quick"] if options.quick else []))


def per_step(results: list[dict], key: str, every: int, scale: float = 1.0) -> list[float]:
    """Each round's `key` total over its timed windows, per timed step, times `scale`."""
    return [round(scale * r[key] / (every * len(r["window_seconds"])), 1) for r in results]


def thread_ms_per_step(result: dict, every: int, at_least: float = 1.0) -> dict[str, float]:
    """CPU milliseconds (user + kernel) per timed step of each thread name of one round's child, those over
    `at_least`: whether anything besides the compute threads (a loader, a logger, a watcher) takes CPU from them."""
    steps = every * len(result["window_seconds"])
    spent = {name: 1e3 * (t["user"] + t["system"]) / steps for name, t in result["timed_thread_seconds"].items()}
    return {name: round(ms, 1) for name, ms in spent.items() if ms >= at_least}


def first_step_fields(results: list[dict], every: int) -> dict[str, float | None]:
    """Medians over rounds of the first step until its results are ready, of that minus the round's median timed
    step (EasyDeL's "compile"), and of trace + compile + launch (JAX sides; None for PyTorch). JSON written before
    2026-12-06 has `first_step_seconds` instead: the whole first step for PyTorch, trace + compile + launch only
    for easytrain and the NNX step."""
    ready = [r["first_step_ready_seconds"] for r in results]
    excess = [r["first_step_ready_seconds"] - statistics.median(r["window_seconds"]) / every for r in results]
    compiled = [r["trace_compile_seconds"] for r in results if r.get("trace_compile_seconds") is not None]
    return {"first_step_ready_seconds": round(statistics.median(ready), 3),
            "first_step_over_median_seconds": round(statistics.median(excess), 3),
            "trace_compile_seconds": round(statistics.median(compiled), 3) if compiled else None}


def summarise(runs: dict[str, list[dict]], tokens_per_step: int, every: int, flops_per_token: int,
              peak: float) -> dict[str, Any]:
    summary = {}
    for contender, results in runs.items():
        rates = [tokens_per_step * every / s for r in results for s in r["window_seconds"]]
        median = statistics.median(rates)
        cpu_rates = [tokens_per_step * every / s for r in results for s in r["window_cpu_seconds"]]
        summary[contender] = {
            "tokens_per_second": round(median, 1), "min": round(min(rates), 1), "max": round(max(rates), 1),
            "per_round": [round(statistics.median(tokens_per_step * every / s for s in r["window_seconds"]), 1)
                          for r in results],
            "per_round_tokens_per_cpu_second": [
                round(statistics.median(tokens_per_step * every / s for s in r["window_cpu_seconds"]), 1)
                for r in results],
            "per_round_minor_faults_per_step": per_step(results, "timed_minor_faults", every),
            "per_round_system_ms_per_step": per_step(results, "timed_system_seconds", every, scale=1e3),
            "per_round_stolen_ms_per_step": per_step(results, "timed_stolen_seconds", every, scale=1e3),
            "per_round_thread_ms_per_step": [thread_ms_per_step(r, every) for r in results],
            "tokens_per_cpu_second": round(statistics.median(cpu_rates), 1),
            **first_step_fields(results, every),
            "peak_rss_mib": round(max(r["peak_rss_mib"] for r in results), 1),
            "cpu_mfu": float(f"{median * flops_per_token / peak:.4g}"), "details": results[0]["details"]}
    return summary


PAIRS = (("easytrain", "hf_trainer"), ("easytrain", "torch_loop"), ("nnx_step", "hf_trainer"),
         ("easytrain", "nnx_step"), ("hf_trainer", "torch_loop"))


def ratios(summary: dict[str, dict], key: str) -> dict[str, float]:
    """`a_over_b` of `key` for each pair of `PAIRS` that ran."""
    return {f"{a}_over_{b}": round(summary[a][key] / summary[b][key], 4)
            for a, b in PAIRS if a in summary and b in summary}


def round_ratios(summary: dict[str, dict]) -> dict[str, list[float]]:
    """`a_over_b` of each round's median tokens/s, round by round: the two sides of a round ran minutes apart on
    the same machine, so these show how far one slow stretch of the machine moves a ratio."""
    return {f"{a}_over_{b}": [round(x / y, 4) for x, y in zip(summary[a]["per_round"], summary[b]["per_round"])]
            for a, b in PAIRS if a in summary and b in summary}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="tiny model, one round: a smoke run")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--windows", type=int, default=3)
    parser.add_argument("--window_steps", type=int, default=4)
    parser.add_argument("--only", default=",".join(CONTENDERS), help="comma-separated contenders")
    parser.add_argument("--child", choices=CONTENDERS, help=argparse.SUPPRESS)
    parser.add_argument("--out")
    options = parser.parse_args(argv)
    if options.warmup < 1:
        parser.error(f"--warmup must be at least 1 (the first step, timed on its own); got {options.warmup}")
    config = {**CONFIG, **QUICK["config"]} if options.quick else CONFIG
    batch, length = (QUICK["batch"], QUICK["length"]) if options.quick else (BATCH, LENGTH)
    if options.child:
        blocks = token_blocks(config["vocab_size"], batch, length)
        result = RUNNERS[options.child](config, blocks, batch, options.warmup, options.windows, options.window_steps)
        result["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        print(json.dumps(result))
        return result

    import transformers

    from easytrain.flops import training_flops_per_token

    contenders = [c for c in options.only.split(",") if c]
    rounds = 1 if options.quick else options.rounds
    runs: dict[str, list[dict]] = {c: [] for c in contenders}
    for r in range(rounds):
        for contender in contenders[r % len(contenders):] + contenders[:r % len(contenders)]:
            runs[contender].append(run_child(contender, options))
    matmul = best_matmul_flops()
    flops_per_token = training_flops_per_token(transformers.LlamaConfig(**config), length)
    summary = summarise(runs, batch * length, options.window_steps, flops_per_token, max(matmul.values()))

    speed = ratios(summary, "tokens_per_second")
    result = {
        "benchmark": "versus_torch", "config": config, "batch": batch, "length": length, "rounds": rounds,
        "windows_per_round": options.windows, "window_steps": options.window_steps,
        "flops_per_token": flops_per_token, "matmul_flops_per_second": {k: round(v) for k, v in matmul.items()},
        "contenders": summary, "ratio_easytrain_over_hf_trainer": speed.get("easytrain_over_hf_trainer"),
        "ratios": speed, "round_ratios": round_ratios(summary),
        "cpu_time_ratios": ratios(summary, "tokens_per_cpu_second"),
        "load_average": list(os.getloadavg()),
    }
    return emit(result, options.out)


if __name__ == "__main__":
    relaunch_like_the_command()
    main()
