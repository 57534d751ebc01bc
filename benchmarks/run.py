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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from benchmarks import headlines as h
from benchmarks.headlines import Headline
from benchmarks.machine import machine_info
from benchmarks.report import relaunch_like_the_command

ROOT = Path(__file__).resolve().parents[1]
TAIL_CHARS = 3000
TIMEOUTS = {"quick": 900, "full": 5400}  # seconds per benchmark, unless --timeout


@dataclass(frozen=True)
class Benchmark:
    name: str
    quick: tuple[str, ...] = ("--quick",)  # what `--suite quick` passes; the full suite passes nothing
    writes_out: bool = True  # takes `--out FILE`; otherwise its JSON is the last JSON line of its stdout
    requires: str | None = None  # an optional package: skipped without it
    full_only: bool = False  # left out of the default quick suite (still runs when named in --only)

    def headlines(self, result: dict) -> list[Headline]:
        """This benchmark's headline numbers, from `benchmarks.headlines.<name>`."""
        return getattr(h, self.name)(result)


BENCHMARKS = {b.name: b for b in (
    Benchmark("overhead", ("--rounds", "3", "--steps_per_round", "5", "--repeats", "1")),
    Benchmark("host_overhead"),
    Benchmark("drift"),
    Benchmark("step_breakdown"),
    Benchmark("gated"),
    Benchmark("maxima"),
    Benchmark("weight_gradients"),
    Benchmark("versus_torch", ("--rounds", "1", "--windows", "2", "--window_steps", "3"), requires="torch"),
    Benchmark("xla_cpu", ("--repeats", "3", "--flag_rounds", "1", "--flag_steps", "3"), requires="torch"),
    Benchmark("generation", ("--batch", "4", "--prompt", "32", "--new", "32"), writes_out=False),
    Benchmark("scaling", ("--quick", "--rounds", "3", "--meshes", "2,2,2"), writes_out=False),
    Benchmark("sft"), Benchmark("dpo"), Benchmark("lora"), Benchmark("qlora", requires="qwix"),
    Benchmark("checkpoint"), Benchmark("data"), Benchmark("remat"), Benchmark("attention"), Benchmark("chunked_ce"),
    Benchmark("scan"), Benchmark("init_compile"), Benchmark("compile_cache"), Benchmark("easydel_peer", full_only=True),
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
    fig.savefig(path, dpi=110, bbox_inches="tight")  # long labels: constrained layout alone cut the x label off
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
