"""First-step compile time of a fresh process with JAX's persistent compilation cache warm, cold and off.

    python -m benchmarks.compile_cache [--quick] [--repeats 2] [--steps 10] [--out FILE]

What a resumed or restarted run pays before its first step: `easytrain train` (the embedded default job)
runs in a child process per case, with `--compilation_cache_dir ''` (no persistent cache), with an empty
cache directory (cold: compiles and stores) and then with that same directory (warm: loads). The first
step's `compile_seconds` (trace, compile or load, first dispatch) comes from each run's metrics.jsonl.
The cases alternate within each repeat; the medians and their ratio are reported. Prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from benchmarks.report import emit, relaunch_like_the_command

CASES = ("off", "cold", "warm")


def first_step_compile(output_dir: Path, cache: str, steps: int) -> float:
    """`compile_seconds` of a fresh `easytrain train` process with `--compilation_cache_dir cache`."""
    env = {key: value for key, value in os.environ.items()
           if key not in ("JAX_COMPILATION_CACHE_DIR", "JAX_ENABLE_COMPILATION_CACHE")}
    env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    command = [sys.executable, "-m", "easytrain", "train", "--output_dir", str(output_dir), "--max_steps", str(steps),
               "--eval_strategy", "no", "--save_strategy", "no", "--save_pretrained_at_end", "false",
               "--report_to", "jsonl", "--disable_progress_bar", "true", "--compilation_cache_dir", cache]
    done = subprocess.run(command, capture_output=True, text=True, env=env)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed (exit {done.returncode}):\n{done.stderr[-3000:]}")
    rows = [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]
    return next(row["compile_seconds"] for row in rows if "compile_seconds" in row)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="1 repeat of 2 steps")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--out", help="also write the JSON result to this file")
    options = parser.parse_args(argv)
    repeats, steps = (1, 2) if options.quick else (options.repeats, options.steps)
    seconds: dict[str, list[float]] = {case: [] for case in CASES}
    with tempfile.TemporaryDirectory(prefix="easytrain-compile-cache-") as scratch:
        root = Path(scratch)
        for repeat in range(repeats):
            cache = root / f"cache{repeat}"
            for case in CASES:
                setting = "" if case == "off" else str(cache)
                seconds[case].append(round(first_step_compile(root / f"{case}{repeat}", setting, steps), 3))
    medians = {case: statistics.median(values) for case, values in seconds.items()}
    result = {"benchmark": "compile_cache", "job": "easytrain train (embedded default)", "repeats": repeats,
              "first_step_compile_seconds": seconds, "median_seconds": medians,
              "warm_over_off": round(medians["warm"] / medians["off"], 3),
              "cold_over_off": round(medians["cold"] / medians["off"], 3),
              "load_average_1m": round(os.getloadavg()[0], 2)}
    for case in CASES:
        print(f"{case:5} first-step compile {medians[case]:.2f} s  {seconds[case]}")
    return emit(result, options.out)


if __name__ == "__main__":
    relaunch_like_the_command()
    main()
