"""easytrain against EasyDeL's trainer on the work of benchmarks/overhead.py, alternated in child processes.

    python -m benchmarks.easydel_peer [--repeats 3] [--python PATH] [--quick] [--out FILE]

EasyDeL pins other jax/flax versions, so it lives in a virtual environment of its own
(`INSTALL` below) and benchmarks/peers/easydel_llama.py runs under that interpreter: `--python`, else
`$EASYDEL_PYTHON`, else `DEFAULT_PYTHON`. Each repeat runs the EasyDeL side, then (unless `--quick`)
easytrain's `benchmarks/overhead.py`, one after the other, so both see nearly the same machine load; the
headline is the median over repeats of the per-repeat ratio easytrain tokens/s / EasyDeL tokens/s. Both sides
measure tokens/s the same way: the median over windows of `--steps_per_round` consecutive steps after the
warm-up, each window timed whole (EasyDeL's `--steps` give its windows, easytrain's timed `--rounds` its own).
Without the interpreter, or when EasyDeL fails, the JSON holds `error` and the exit status is still 0:
a missing peer is a recorded result, not a crash. `--quick` runs the EasyDeL side once at a tiny size
(no easytrain side, no ratio): a check that the peer still runs. Prints one JSON line.

The first step means the same on both sides: `first_step_ready_seconds` from its start until step 1's results are
ready (trace, compile, launch and the run; EasyDeL's `first_step_seconds`), `first_step_over_median_seconds` that
minus the median later step (EasyDeL's `compile_seconds`). easytrain's `trainer_compile_seconds` is trace + compile +
launch alone, which EasyDeL does not report. JSON written before 2026-12-06 has `trainer_first_step_seconds` in
`easytrain`: that was `trainer_compile_seconds`, not a whole first step.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any

from benchmarks.report import emit, relaunch_like_the_command

ROOT = Path(__file__).resolve().parents[1]
PEER = ROOT / "benchmarks" / "peers" / "easydel_llama.py"
DEFAULT_PYTHON = "/work/easydel-venv/bin/python"
INSTALL = ("python3 -m venv /work/easydel-venv && "
           "/work/easydel-venv/bin/pip install easydel==0.3.0 pillow torch==2.13.0")
TAIL_CHARS = 2000
#: What overhead.py's trainer reports as lists over its cold processes, taken from its first: trace + compile +
#: launch, the first step until ready, and that minus the median later step (EasyDeL's "compile").
FIRST_PROCESS = ("compile_seconds", "first_step_ready_seconds", "first_step_over_median_seconds")


def resolve_python(flag: str | None) -> str:
    """The EasyDeL interpreter: the flag, else $EASYDEL_PYTHON, else the default venv."""
    return flag or os.environ.get("EASYDEL_PYTHON") or DEFAULT_PYTHON


def last_json(stdout: str) -> dict[str, Any] | None:
    for line in reversed(stdout.splitlines()):
        try:
            found = json.loads(line)
        except ValueError:
            continue
        if isinstance(found, dict):
            return found
    return None


def run_child(command: list[str], timeout: float) -> dict[str, Any]:
    """One side in a child process: its last JSON line, or an `error` with the tail of its output."""
    try:
        done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s: {' '.join(command)}"}
    except OSError as error:
        return {"error": f"could not start {command[0]}: {error}"}
    result = last_json(done.stdout)
    if result is None or done.returncode != 0:
        tail = (done.stderr or done.stdout or "(no output)")[-TAIL_CHARS:]
        return {**(result or {}), "error": (result or {}).get("error") or f"exit {done.returncode}: {tail}"}
    return result


def median_or_none(values: list[float | None]) -> float | None:
    present = [v for v in values if isinstance(v, (int, float))]
    return round(statistics.median(present), 4) if present else None


def compare(python: str, options: argparse.Namespace) -> dict[str, Any]:
    """Alternate the two sides `repeats` times; medians of each side and of the per-repeat ratios."""
    peer = [python, str(PEER), *(["--quick"] if options.quick else
                                 ["--steps", str(options.steps), "--warmup", str(options.warmup),
                                  "--window_steps", str(options.steps_per_round)])]
    ours = [sys.executable, "-m", "benchmarks.overhead", "--rounds", str(options.rounds),
            "--steps_per_round", str(options.steps_per_round), "--repeats", "1"]
    repeats: list[dict[str, Any]] = []
    for _ in range(1 if options.quick else options.repeats):
        theirs = run_child(peer, options.timeout)
        row: dict[str, Any] = {"easydel": theirs}
        if theirs.get("error"):
            repeats.append(row)
            break
        if not options.quick:
            mine = run_child(ours, options.timeout)
            if not mine.get("error"):  # the trainer alone in a cold process: its first step, compile, peak RSS
                for key in FIRST_PROCESS:
                    mine[key] = (mine.get(f"trainer_{key}") or [None])[0]
                mine["peak_rss_mib"] = mine["trainer_peak_rss_mib"][0]
            row["easytrain"] = mine
            row["ratio"] = (round(mine["trainer_tokens_per_second"] / theirs["tokens_per_second"], 4)
                            if not mine.get("error") else None)
        repeats.append(row)
    first = repeats[0]["easydel"]
    errors = [side["error"] for row in repeats for side in (row.get("easydel", {}), row.get("easytrain", {}))
              if side.get("error")]

    def med(side: str, key: str) -> float | None:
        return median_or_none([row.get(side, {}).get(key) for row in repeats])

    return {
        "versions": first.get("versions"), "repeats": len(repeats),
        "tokens_per_second": med("easydel", "tokens_per_second"),
        "tokens_per_second_per_step_median": med("easydel", "tokens_per_second_per_step_median"),
        "compile_seconds": med("easydel", "compile_seconds"),
        "first_step_seconds": med("easydel", "first_step_seconds"),
        "first_step_ready_seconds": med("easydel", "first_step_seconds"),
        "first_step_over_median_seconds": med("easydel", "compile_seconds"),
        "peak_rss_mib": med("easydel", "peak_rss_mib"),
        "easytrain": None if options.quick else {
            "trainer_tokens_per_second": med("easytrain", "trainer_tokens_per_second"),
            **{f"trainer_{key}": med("easytrain", key) for key in FIRST_PROCESS},
            "peak_rss_mib": med("easytrain", "peak_rss_mib")},
        "ratio_easytrain_over_easydel": median_or_none([row.get("ratio") for row in repeats]),
        "per_repeat_ratio": [row.get("ratio") for row in repeats], "per_repeat": repeats,
        "error": "; ".join(errors) or None,
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--python", help=f"EasyDeL's interpreter (default: $EASYDEL_PYTHON or {DEFAULT_PYTHON})")
    parser.add_argument("--repeats", type=int, default=3, help="alternations of the two sides")
    parser.add_argument("--steps", type=int, default=60, help="EasyDeL: timed steps after the warm-up")
    parser.add_argument("--warmup", type=int, default=5, help="EasyDeL: untimed first steps")
    parser.add_argument("--rounds", type=int, default=7, help="easytrain (overhead.py): rounds, the first untimed")
    parser.add_argument("--steps_per_round", type=int, default=10,
                        help="steps per timed window of either side (easytrain: per round)")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds per child process")
    parser.add_argument("--quick", action="store_true", help="EasyDeL side only, tiny, once")
    parser.add_argument("--out", help="also write the JSON line here")
    options = parser.parse_args(argv)
    if options.repeats < 1:
        parser.error("--repeats must be at least 1")
    if options.steps < options.steps_per_round:
        parser.error(f"--steps ({options.steps}) must hold at least one window of --steps_per_round "
                     f"({options.steps_per_round}) steps")
    python = resolve_python(options.python)
    result: dict[str, Any] = {"benchmark": "easydel_peer", "contender": "easydel", "python": python}
    if not Path(python).exists():
        result["error"] = f"EasyDeL venv not found: {python}; create it with {INSTALL}"
    else:
        result.update(compare(python, options))
    return emit(result, options.out)


if __name__ == "__main__":
    relaunch_like_the_command()
    main()
