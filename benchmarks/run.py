"""Run every benchmark, each in a child process of its own, and summarise them: a table, JSON and a PNG chart.

    python -m benchmarks.run [--suite quick|full] [--only sft,dpo] [--out results.json] [--chart results.png]
                             [--timeout SECONDS] [--extra 'sft=--steps 5 --repeats 3']

Each benchmark runs as `python -m benchmarks.<name> ...` from the repository root, one after the other, so a
crash or a timeout fails that benchmark only and peak memory stays per benchmark. `--suite quick` gives
each its `--quick` profile (or, for the scripts without one, small sizes set here); `--suite full` their
defaults; `easydel_peer` (EasyDeL in an environment of its own, minutes) is in the full suite only unless
named in `--only`. `--extra name=ARGS` appends arguments to one benchmark's command line (later flags win).
Contenders are alternated inside each benchmark (one process, or interleaved child processes), after
warm-up, and each reports medians and spreads itself; this runner only collects them.

Recorded per benchmark: status (`ok`, `failed` with the tail of its stderr, `timeout`, `skipped` when an
optional package is missing), wall seconds, the command and its JSON result. A few headline numbers per
benchmark (with their spread where the benchmark reports one) are printed as a table; the JSON written to
`--out` also holds the machine (device, CPUs, jax version, date, load average, git commit, glibc tunables).
Headline ratios are drawn as a bar chart (reference line at 1.0) next to `--out` (same name, `.png`) or at `--chart`.
Exit status 1 if any benchmark failed or timed out. No timing is asserted anywhere.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import json
import os
import shlex
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from benchmarks.machine import machine_info
from benchmarks.report import relaunch_like_the_command

ROOT = Path(__file__).resolve().parents[1]
TAIL_CHARS = 3000
TIMEOUTS = {"quick": 900, "full": 5400}  # seconds per benchmark, unless --timeout


@dataclass(frozen=True)
class Headline:
    """One number of the summary: `ratio`s (dimensionless, 1.0 = parity) are also drawn in the chart."""

    benchmark: str
    label: str
    value: float | None
    low: float | None = None  # spread (min, max over the benchmark's repeats), where it reports one
    high: float | None = None
    ratio: bool = True


def dig(tree: Any, path: str) -> Any:
    """`tree["a"]["b"]...` for the path "a.b...", or None where any key is missing."""
    for key in path.split("."):
        tree = tree.get(key) if isinstance(tree, dict) else None
    return tree


def quotient(a: Any, b: Any, digits: int = 4) -> float | None:
    ok = all(isinstance(x, (int, float)) for x in (a, b)) and b
    return round(a / b, digits) if ok else None


def overhead(r: dict) -> list[Headline]:
    rounds = dig(r, "ratio_trainer_over_loop_per_round") or []
    low, high = (min(rounds), max(rounds)) if rounds else (None, None)
    return [Headline("overhead", "easytrain / hand-written tokens/s", dig(r, "ratio_trainer_over_loop"), low, high),
            Headline("overhead", "easytrain / hand-written compile s", dig(r, "ratio_compile_trainer_over_loop")),
            Headline("overhead", "easytrain / hand-written peak RSS", dig(r, "ratio_peak_rss_trainer_over_loop")),
            Headline("overhead", "easytrain / hand-written RSS added by training",
                     dig(r, "ratio_added_rss_trainer_over_loop")),
            Headline("overhead", "easytrain / hand-written planned device memory",
                     dig(r, "ratio_planned_memory_trainer_over_loop")),
            Headline("overhead", "easytrain tokens/s", dig(r, "trainer_tokens_per_second"), ratio=False)]


def step_breakdown(r: dict) -> list[Headline]:
    rows = [Headline("step_breakdown", "hand-written / trainer step time", dig(r, "ratio_hand_written_over_trainer"))]
    for part in ("grad_norm", "accuracy", "guard"):
        low, high = dig(r, f"part_ms_spread.{part}") or (None, None)
        rows.append(Headline("step_breakdown", f"{part}: ms of the trainer's step", dig(r, f"part_ms.{part}"),
                             low, high, ratio=False))
    return rows + [Headline("step_breakdown", "all three: ms of the trainer's step", dig(r, "extras_ms"), ratio=False),
                   Headline("step_breakdown", "the rest vs hand-written: ms", dig(r, "residual_ms"), ratio=False)]


def versus_torch(r: dict) -> list[Headline]:
    def side(name: str) -> Headline:
        c = dig(r, f"contenders.{name}") or {}
        return Headline("versus_torch", f"{name} tokens/s", c.get("tokens_per_second"), c.get("min"), c.get("max"),
                        ratio=False)

    return [Headline("versus_torch", "easytrain / HF Trainer tokens/s", dig(r, "ratios.easytrain_over_hf_trainer")),
            Headline("versus_torch", "easytrain / PyTorch loop tokens/s", dig(r, "ratios.easytrain_over_torch_loop")),
            *(side(name) for name in ("easytrain", "hf_trainer", "torch_loop", "nnx_step")),
            Headline("versus_torch", "easytrain CPU MFU", dig(r, "contenders.easytrain.cpu_mfu"))]


def xla_cpu(r: dict) -> list[Headline]:
    return [Headline("xla_cpu", "JAX / PyTorch step time, one process", dig(r, "phases.ms.step.jax_over_torch")),
            Headline("xla_cpu", "JAX / PyTorch AdamW update time", dig(r, "phases.ms.adamw.jax_over_torch")),
            *(Headline("xla_cpu", f"XLA flags {name} / default tokens/s", dig(r, f"flags.{name}.over_default"))
              for name in (dig(r, "flags") or {}) if name != "default")]


def generation(r: dict) -> list[Headline]:
    return [Headline("generation", "KV cache / no cache tokens/s", dig(r, "speedup")),
            Headline("generation", "KV cache new tokens/s", dig(r, "cache_tokens_per_second"), ratio=False)]


def scaling(r: dict) -> list[Headline]:
    def label(m: dict) -> str:
        return "constrained / plain step, mesh " + ",".join(str(m.get(k, "?")) for k in ("data", "fsdp", "tensor"))
    return [Headline("scaling", label(dig(m, "mesh") or {}),
                     quotient(dig(m, "constrained.step_seconds"), dig(m, "plain.step_seconds")))
            for m in dig(r, "meshes") or [{}]]


def sft(r: dict) -> list[Headline]:
    s = dig(r, "speedup_supervised_tokens_per_second") or {}
    return [Headline("sft", "packing / padding supervised tokens/s", s.get("median_ratio"),
                     s.get("per_repeat_min"), s.get("per_repeat_max"))]


def dpo(r: dict) -> list[Headline]:
    def step(side: str, label: str) -> Headline:  # process CPU seconds: steadier than wall on shared cores
        ratio = dig(r, f"cpu_ratio_over_sft.{side}") or {}
        return Headline("dpo", label, ratio.get("of_medians"), dig(ratio, "per_repeat.min"),
                        dig(ratio, "per_repeat.max"))
    return [step("dpo_frozen", "DPO (frozen ref) / SFT step CPU time"),
            step("dpo_adapter_off_lora", "DPO (LoRA, adapter-off ref) / SFT step CPU time"),
            Headline("dpo", "DPO (frozen ref) / SFT state bytes", quotient(
                dig(r, "memory.state_bytes.dpo_frozen.total"), dig(r, "memory.state_bytes.sft.total")))]


def lora(r: dict) -> list[Headline]:
    ratio = dig(r, "lora_over_full") or {}
    return [Headline("lora", "LoRA / full step time", ratio.get("step_seconds_of_medians"),
                     dig(ratio, "step_seconds_per_round.min"), dig(ratio, "step_seconds_per_round.max")),
            Headline("lora", "LoRA / full optimizer bytes", ratio.get("opt_state_bytes")),
            Headline("lora", "LoRA / full peak RSS", ratio.get("peak_rss"))]


def qlora(r: dict) -> list[Headline]:
    return [Headline("qlora", "NF4 / float32 projection bytes (packed)",
                     dig(r, "base_bytes_over_float.qwix_qlora_nf4.packed_bytes")),
            Headline("qlora", "int8 / float32 projection bytes (held)",
                     dig(r, "base_bytes_over_float.qwix_qlora_int8.on_device_bytes")),
            Headline("qlora", "NF4 QLoRA / LoRA eval loss", quotient(
                dig(r, "sides.qwix_qlora_nf4.eval_loss"), dig(r, "sides.easytrain_lora.eval_loss")))]


def checkpoint(r: dict) -> list[Headline]:
    return [Headline("checkpoint", "async save: loop blocked / sync save", r.get("blocked_over_sync")),
            Headline("checkpoint", "peak RSS added by a save / state bytes", dig(r, "peak_added_over_state.async"))]


def data(r: dict) -> list[Headline]:
    resume = list((r.get("resume_first_batch_seconds") or {}).values())
    return [Headline("data", "tokenise + pack / training tokens/s", r.get("prepare_over_train")),
            Headline("data", "batching / training tokens/s", r.get("batch_over_train")),
            Headline("data", "resume to first batch: step 10M / step 0", quotient(resume[-1], resume[0])
                     if len(resume) > 1 else None)]


def remat(r: dict) -> list[Headline]:
    return [Headline("remat", f"remat {policy} / none: step temp bytes", dig(r, f"policies.{policy}.temp_over_none"))
            for policy in ("full", "dots")] + [
        Headline("remat", f"remat {policy} / none: step time", dig(r, f"policies.{policy}.time_over_none"))
        for policy in ("full", "dots")]


def attention(r: dict) -> list[Headline]:
    longest = (r.get("lengths") or [{}])[-1]
    at = f"xla at T={longest.get('length', '?')}"
    ratios = longest.get("over_xla", {})
    label = f"dot_product_attention / {at} ({r.get('kernel', '?')} kernel)"
    lines = [Headline("attention", f"{label}: step time", dig(ratios, "dot_product_attention.time")),
             Headline("attention", f"{label}: step temp bytes", dig(ratios, "dot_product_attention.temp"))]
    if "splash" in ratios:  # off TPU the kernel is interpreted: only its memory means anything there
        lines.append(Headline("attention", f"splash / {at}: step temp bytes", dig(ratios, "splash.temp")))
    return lines


def chunked_ce(r: dict) -> list[Headline]:
    chunks = [c for c in (r.get("chunks") or {}) if c != "0"] or ["?"]
    return [Headline("chunked_ce", f"loss chunk {c} / full logits: step temp bytes",
                     dig(r, f"chunks.{c}.temp_over_full")) for c in chunks] + [
        Headline("chunked_ce", f"loss chunk {c} / full logits: step time", dig(r, f"chunks.{c}.time_over_full"))
        for c in chunks]


def scan(r: dict) -> list[Headline]:
    deepest = max((dig(r, "depths") or {"?": None}), key=lambda d: int(d) if d.isdigit() else 0)
    ratio = dig(r, f"depths.{deepest}.scan_over_unrolled") or {}
    return [Headline("scan", f"scan / unrolled layers: first-step compile, depth {deepest}",
                     ratio.get("first_step_compile")),
            Headline("scan", f"scan / unrolled layers: step time, depth {deepest}", ratio.get("step_time")),
            Headline("scan", f"scan / unrolled layers: step temp bytes, depth {deepest}", ratio.get("temp"))]


def compile_cache(r: dict) -> list[Headline]:
    return [Headline("compile_cache", "warm / no persistent cache: first-step compile", r.get("warm_over_off")),
            Headline("compile_cache", "cold / no persistent cache: first-step compile", r.get("cold_over_off"))]


def easydel_peer(r: dict) -> list[Headline]:
    if r.get("error"):  # no EasyDeL environment, or EasyDeL failed: recorded, shown, not a crash
        return [Headline("easydel_peer", f"error: {str(r['error']).splitlines()[0][:100]}", None, ratio=False)]
    ratios = [x for x in r.get("per_repeat_ratio") or [] if isinstance(x, (int, float))]
    return [Headline("easydel_peer", "easytrain / EasyDeL trainer tokens/s", r.get("ratio_easytrain_over_easydel"),
                     min(ratios, default=None), max(ratios, default=None)),
            Headline("easydel_peer", "EasyDeL tokens/s", r.get("tokens_per_second"), ratio=False)]


@dataclass(frozen=True)
class Benchmark:
    name: str
    headlines: Callable[[dict], list[Headline]]
    quick: tuple[str, ...] = ("--quick",)  # what `--suite quick` passes; the full suite passes nothing
    writes_out: bool = True  # takes `--out FILE`; otherwise its JSON is the last JSON line of its stdout
    requires: str | None = None  # an optional package: skipped without it
    full_only: bool = False  # left out of the default quick suite (still runs when named in --only)


BENCHMARKS = {b.name: b for b in (
    Benchmark("overhead", overhead, ("--rounds", "3", "--steps_per_round", "5", "--repeats", "1")),
    Benchmark("step_breakdown", step_breakdown),
    Benchmark("versus_torch", versus_torch, ("--rounds", "1", "--windows", "2", "--window_steps", "3"),
              requires="torch"),
    Benchmark("xla_cpu", xla_cpu, ("--repeats", "3", "--flag_rounds", "1", "--flag_steps", "3"), requires="torch"),
    Benchmark("generation", generation, ("--batch", "4", "--prompt", "32", "--new", "32"), writes_out=False),
    Benchmark("scaling", scaling, ("--quick", "--rounds", "3", "--meshes", "2,2,2"), writes_out=False),
    Benchmark("sft", sft), Benchmark("dpo", dpo), Benchmark("lora", lora),
    Benchmark("qlora", qlora, requires="qwix"), Benchmark("checkpoint", checkpoint), Benchmark("data", data),
    Benchmark("remat", remat),
    Benchmark("attention", attention),
    Benchmark("chunked_ce", chunked_ce),
    Benchmark("scan", scan),
    Benchmark("compile_cache", compile_cache),
    Benchmark("easydel_peer", easydel_peer, full_only=True),
) if (ROOT / "benchmarks" / f"{b.name}.py").exists()}


def read_result(out: Path | None, stdout: str) -> dict | None:
    """The JSON the benchmark wrote to `out`, else the last JSON line of its stdout; None if neither parses."""
    lines = [out.read_text()] if out and out.exists() else reversed(stdout.splitlines())
    for line in lines:
        try:
            return json.loads(line)
        except ValueError:
            continue
    return None


def run_one(bench: Benchmark, suite: str, extra: list[str], timeout: float, scratch: Path) -> dict[str, Any]:
    """Run one benchmark in its own process group (a timeout also ends its children)."""
    if bench.requires and importlib.util.find_spec(bench.requires) is None:
        return {"status": "skipped", "reason": f"needs the optional package {bench.requires!r}"}
    out = scratch / f"{bench.name}.json"
    command = [sys.executable, "-m", f"benchmarks.{bench.name}", *(bench.quick if suite == "quick" else ()),
               *(("--out", str(out)) if bench.writes_out else ()), *extra]
    record: dict[str, Any] = {"command": shlex.join(command[1:])}
    started = time.perf_counter()
    child = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             start_new_session=True)
    timed_out = False
    try:
        stdout, stderr = child.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        timed_out = True
        os.killpg(child.pid, signal.SIGKILL)
        stdout, stderr = child.communicate()
    record.update(seconds=round(time.perf_counter() - started, 1), returncode=child.returncode)
    result = read_result(out if bench.writes_out else None, stdout)
    if child.returncode == 0 and isinstance(result, dict):
        return {"status": "ok", **record, "result": result}
    status = "timeout" if timed_out else "failed"
    tail = stderr[-TAIL_CHARS:] or stdout[-TAIL_CHARS:] or "(no output)"
    return {"status": status, **record, "error": tail if child.returncode else "no JSON result in its output"}


def headlines(benchmarks: dict[str, dict[str, Any]]) -> list[Headline]:
    rows = []
    for name, record in benchmarks.items():
        if record["status"] != "ok":
            rows.append(Headline(name, record["status"], None, ratio=False))
            continue
        try:
            rows += BENCHMARKS[name].headlines(record["result"])
        except Exception as error:  # a changed result layout must not lose the others' numbers
            rows.append(Headline(name, f"headline error: {error!r}", None, ratio=False))
    return rows


def fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4g}"


def print_table(rows: list[Headline], benchmarks: dict[str, dict[str, Any]]) -> None:
    table = [("benchmark", "status", "wall s", "headline", "value", "spread [min, max]")]
    for row in rows:
        record = benchmarks[row.benchmark]
        spread = "" if row.low is None and row.high is None else f"[{fmt(row.low)}, {fmt(row.high)}]"
        table.append((row.benchmark, record["status"], str(record.get("seconds", "")), row.label, fmt(row.value),
                      spread))
    widths = [max(len(line[i]) for line in table) for i in range(len(table[0]))]
    for line in table:
        print("  ".join(cell.ljust(width) for cell, width in zip(line, widths)).rstrip())


def draw_chart(rows: list[Headline], path: Path, title: str) -> bool:
    """Bars of the ratio headlines from 1.0 (log scale), spread as error bars; False without matplotlib."""
    try:
        from matplotlib import ticker
        from matplotlib.figure import Figure  # renders through the Agg canvas; pyplot is never imported
    except ImportError:
        return False
    bars = [row for row in rows if row.ratio and row.value is not None and row.value > 0]
    fig = Figure(figsize=(10, 1.3 + 0.4 * max(len(bars), 1)), layout="constrained")
    ax = fig.add_subplot()
    colours = {name: f"C{i % 10}" for i, name in enumerate(dict.fromkeys(row.benchmark for row in bars))}
    ends = [1.0]
    for y, row in enumerate(bars):
        low = row.value if row.low is None else row.low
        high = row.value if row.high is None else row.high
        err = [[max(row.value - low, 0)], [max(high - row.value, 0)]] if (low, high) != (row.value,) * 2 else None
        ax.barh(y, row.value - 1.0, left=1.0, color=colours[row.benchmark], xerr=err, capsize=3)
        right = row.value >= 1.0  # the value is written beyond the bar's far end (and its whisker)
        ax.annotate(f" {row.value:.3g} " if right else f"{row.value:.3g} ",
                    (max(row.value, high) if right else min(row.value, low), y), va="center",
                    ha="left" if right else "right", fontsize="small")
        ends += [row.value, low, high]
    ax.set_yticks(range(len(bars)), [f"{row.benchmark}: {row.label}" for row in bars], fontsize="small")
    ax.invert_yaxis()
    ax.set_xscale("log")
    ax.set_xlim(min(ends) / 1.6, max(ends) * 1.6)
    plain = ticker.FuncFormatter(lambda x, _: f"{x:g}")
    ax.xaxis.set_major_formatter(plain)
    ax.xaxis.set_minor_formatter(plain if max(ends) / min(ends) < 30 else ticker.NullFormatter())
    ax.tick_params(axis="x", which="minor", labelsize="x-small")
    ax.axvline(1.0, color="black", linewidth=1)
    ax.set_xlabel("ratio (log scale; bars start at 1.0; whiskers: spread over repeats, where reported)")
    ax.set_title(title, fontsize="medium")
    if not bars:
        ax.text(0.5, 0.5, "no ratios to show", transform=ax.transAxes, ha="center")
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    return True


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--suite", choices=("quick", "full"), default="quick")
    parser.add_argument("--only", help=f"comma-separated names (default: all of {', '.join(BENCHMARKS)})")
    parser.add_argument("--out", help="write the JSON summary here (and the chart next to it, as .png)")
    parser.add_argument("--chart", help="where to write the PNG chart (default: --out with .png)")
    parser.add_argument("--timeout", type=float, help="seconds per benchmark (default: quick 900, full 5400)")
    parser.add_argument("--extra", action="append", default=[], metavar="NAME=ARGS",
                        help="append ARGS (shell-quoted) to one benchmark's command line; repeatable")
    options = parser.parse_args(argv)
    options.names = ([n.strip() for n in options.only.split(",") if n.strip()] if options.only else
                     [n for n, b in BENCHMARKS.items() if options.suite == "full" or not b.full_only])
    unknown = [n for n in options.names if n not in BENCHMARKS]
    options.extras = {}
    for item in options.extra:
        name, _, args = item.partition("=")
        unknown += [name] if name not in BENCHMARKS else []
        options.extras[name] = options.extras.get(name, []) + shlex.split(args)
    if unknown:
        parser.error(f"unknown benchmark(s) {', '.join(unknown)}; known: {', '.join(BENCHMARKS)}")
    options.timeout = options.timeout or TIMEOUTS[options.suite]
    return options


def main(argv: list[str] | None = None) -> dict[str, Any]:
    options = parse(argv)
    machine = machine_info()
    benchmarks: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory(prefix="easytrain-bench-run-") as scratch:
        for name in options.names:
            print(f"[{name}] running ...", flush=True)
            benchmarks[name] = run_one(BENCHMARKS[name], options.suite, options.extras.get(name, []),
                                       options.timeout, Path(scratch))
            record = benchmarks[name]
            why = (record.get("error") or record.get("reason") or "").strip().splitlines()[-1:]
            print(f"[{name}] {record['status']} in {record.get('seconds', 0)} s", *why, flush=True)
    machine["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
    rows = headlines(benchmarks)
    print_table(rows, benchmarks)
    chart = options.chart or (str(Path(options.out).with_suffix(".png")) if options.out else None)
    if chart and not draw_chart(rows, Path(chart), f"easytrain benchmarks ({options.suite} suite), "
                                f"{machine['device_kind'] or '?'}, {machine['date'][:10]}"):
        print("no chart: matplotlib is not installed (pip install 'easytrain[plot]')")
        chart = None
    summary = {"suite": options.suite, "machine": machine, "chart": chart,
               "headlines": [row.__dict__ for row in rows],
               "statuses": {name: record["status"] for name, record in benchmarks.items()},
               "seconds": round(sum(r.get("seconds", 0) for r in benchmarks.values()), 1)}
    print(json.dumps(summary))
    output = {**summary, "benchmarks": benchmarks}
    if options.out:
        Path(options.out).parent.mkdir(parents=True, exist_ok=True)
        Path(options.out).write_text(json.dumps(output, indent=1) + "\n")
    return output


if __name__ == "__main__":
    relaunch_like_the_command()
    sys.exit(1 if {"failed", "timeout"} & set(main()["statuses"].values()) else 0)
