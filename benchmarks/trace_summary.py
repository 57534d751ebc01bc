"""Where a traced run's device time went: its kernels, summed by XLA op, from a `profile_steps` trace.

    python -m benchmarks.trace_summary OUTPUT_DIR/tensorboard [--top 25]

Reads the newest `plugins/profile/<time>/perfetto_trace.json.gz` under the directory (what `profile_steps` writes)
and sums the duration of every kernel event by its XLA op (`hlo_op`, else the event's name): on a GPU the events of
the device's streams, on the CPU XLA's thunk executions (whose matmul events end when the work is handed to Eigen,
so they undercount the products). Reports the traced steps, the total kernel time, and the `--top` ops with their
milliseconds, calls and share of the total. Prints one JSON line. `benchmarks/gpu.py` adds it to its result when
run with `--profile_steps`.
"""

from __future__ import annotations

import argparse
import collections
import gzip
import json
from pathlib import Path
from typing import Any

from easytrain.profiling import STEP_NAME


def newest_trace(directory: str | Path) -> Path:
    """The newest trace's Perfetto file under `directory` (a run's `tensorboard/`, or one trace's own directory)."""
    found = sorted(Path(directory).glob("**/perfetto_trace.json.gz"), key=lambda path: path.parent.name)
    if not found:
        raise FileNotFoundError(f"no perfetto_trace.json.gz under {directory}; was the run traced (profile_steps)?")
    return found[-1]


def device_processes(events: list[dict[str, Any]]) -> set[int]:
    """The trace's device processes (`/device:GPU:0`, ...): their events are the kernels as the device ran them."""
    return {event["pid"] for event in events if event.get("ph") == "M" and event.get("name") == "process_name"
            and str(event.get("args", {}).get("name", "")).startswith("/device:")}


def kernel_events(events: list[dict[str, Any]]) -> tuple[str, list[dict[str, Any]]]:
    """The kernel events and where they come from: a device's streams if the trace has any, else XLA:CPU's thunks."""
    complete = [event for event in events if event.get("ph") == "X" and "dur" in event]
    if devices := device_processes(events):
        return "device", [event for event in complete if event["pid"] in devices]
    return "host thunks", [event for event in complete if "hlo_op" in event.get("args", {})
                           and not str(event.get("name", "")).startswith("end: ")]


def summarize(directory: str | Path, top: int = 25) -> dict[str, Any]:
    path = newest_trace(directory)
    events = json.loads(gzip.decompress(path.read_bytes()))["traceEvents"]
    source, kernels = kernel_events(events)
    total: collections.Counter[str] = collections.Counter()
    calls: collections.Counter[str] = collections.Counter()
    for event in kernels:
        op = str(event.get("args", {}).get("hlo_op") or event.get("name"))
        total[op] += float(event["dur"])
        calls[op] += 1
    all_us = sum(total.values())
    steps = sorted({int(event["args"]["step_num"]) for event in events
                    if event.get("name") == STEP_NAME and "step_num" in event.get("args", {})})
    return {"trace": str(path), "source": source, "traced_steps": steps, "kernel_ms": round(all_us / 1e3, 3),
            "kernels": len(kernels),
            "top_ops": [{"op": op, "ms": round(us / 1e3, 3), "calls": calls[op],
                         "share": round(us / all_us, 4) if all_us else None}
                        for op, us in total.most_common(top)]}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("directory", help="a traced run's output_dir/tensorboard, or one trace's directory")
    parser.add_argument("--top", type=int, default=25)
    options = parser.parse_args(argv)
    result = summarize(options.directory, options.top)
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
