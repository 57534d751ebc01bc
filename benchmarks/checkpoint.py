"""Checkpoint cost: how long a save blocks the training loop (async vs synchronous), restore time, and the
host memory a save needs.

    python -m benchmarks.checkpoint [--quick] [--stack_layers N] [--out FILE]

The state is a `TrainState`-like pytree of float32 arrays of `--megabytes` in total (weights plus two
AdamW-moment copies, in a Llama's shapes), saved with easytrain's `CheckpointManager` exactly as the loop
saves it: fingerprint digests, the Orbax state item and the JSON items. Per repeat, alternating:

- **async**: seconds until `save()` returns (what the loop waits for: digests, the device-to-host copy,
  scheduling), then seconds until the background write is committed;
- **sync**: seconds of the same save with `async_save=False` (all of it blocks the loop);
- **restore**: seconds to restore the checkpoint into the state's shapes and shardings (digests verified).

A sampling thread reads this process's RSS every 2 ms during each save; "peak added" is the highest
reading minus the RSS just before the save, compared with the state's bytes. Medians, min and max over
`--repeats`; prints a table and one JSON line. No timing is asserted anywhere.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Callable

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import psutil  # noqa: E402

from easytrain.checkpoint import CheckpointManager  # noqa: E402
from benchmarks.report import emit, relaunch_like_the_command  # noqa: E402

PROFILES = {"full": dict(megabytes=1200, repeats=5), "quick": dict(megabytes=24, repeats=2)}


def make_state(megabytes: int, stack_layers: int = 0) -> dict[str, Any]:
    """Parameters and two moment copies (a third each), in 4 MiB-ish blocks like a Llama's matrices; with
    `stack_layers` L, every L blocks are one `[L, 1024, 1024]` array, as `scan_layers` stores a model's."""
    per_part = megabytes * 2**20 // 3
    rows = 1024
    count = max(1, per_part // (rows * 1024 * 4))
    key = jax.random.key(0)
    params = {f"layer_{i}": jax.random.normal(jax.random.fold_in(key, i), (rows, 1024)) for i in range(count)}
    if stack_layers > 1:
        blocks = list(params.values())
        params = {f"stack_{i}": jnp.stack(blocks[start:start + stack_layers])
                  for i, start in enumerate(range(0, len(blocks), stack_layers))}
    state = {"params": params, "mu": jax.tree.map(lambda x: 0.1 * x, params),
             "nu": jax.tree.map(lambda x: x * x, params), "step": jnp.int32(0)}
    return jax.block_until_ready(state)


class PeakRss:
    """Highest RSS of this process while the block runs, sampled every 2 ms by a thread."""

    def __enter__(self) -> "PeakRss":
        self.process, self.running = psutil.Process(), True
        self.before = self.peak = self.process.memory_info().rss
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()
        return self

    def _sample(self) -> None:
        while self.running:
            self.peak = max(self.peak, self.process.memory_info().rss)
            time.sleep(0.002)

    def __exit__(self, *exc_info: object) -> None:
        self.running = False
        self.thread.join()
        self.peak = max(self.peak, self.process.memory_info().rss)

    @property
    def added(self) -> int:
        return self.peak - self.before


def save_once(directory: Path, state: Any, step: int, async_save: bool) -> dict[str, float]:
    with CheckpointManager(directory, async_save=async_save) as manager, PeakRss() as rss:
        started = time.perf_counter()
        manager.save(step, state=state, data_state={"position": step}, run_info={"format_version": 1})
        returned = time.perf_counter()
        manager.wait_until_finished()
        done = time.perf_counter()
    return {"blocked": returned - started, "total": done - started, "peak_added_bytes": rss.added}


def restore_once(directory: Path, state: Any, step: int) -> float:
    target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)
    with CheckpointManager(directory) as manager:
        started = time.perf_counter()
        restored, _, _ = manager.restore(step, abstract_state=target)
        jax.block_until_ready(restored)
        return time.perf_counter() - started


def spread(values: list[float], digits: int = 4) -> dict[str, float]:
    return {"median": round(statistics.median(values), digits), "min": round(min(values), digits),
            "max": round(max(values), digits)}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="24 MB state, 2 repeats")
    parser.add_argument("--megabytes", type=int, help="state size (default: 1200 full, 24 quick)")
    parser.add_argument("--repeats", type=int, help="saves of each kind (default: 5 full, 2 quick)")
    parser.add_argument("--stack_layers", type=int, default=0,
                        help="store every N blocks as one [N, ...] array, as scan_layers does (0: separate arrays)")
    parser.add_argument("--out", help="also write the JSON result to this file")
    options = parser.parse_args(argv)
    profile = PROFILES["quick" if options.quick else "full"]
    megabytes, repeats = options.megabytes or profile["megabytes"], options.repeats or profile["repeats"]
    state = make_state(megabytes, options.stack_layers)
    state_bytes = sum(leaf.nbytes for leaf in jax.tree.leaves(state))
    runs: dict[str, list[dict[str, float]]] = {"async": [], "sync": []}
    restores: list[float] = []
    with tempfile.TemporaryDirectory(prefix="easytrain-bench-ckpt-") as scratch:
        kinds: list[tuple[str, Callable[..., dict[str, float]]]] = [("async", save_once), ("sync", save_once)]
        for repeat in range(repeats + 1):  # the first round warms up (compiles the digests), not reported
            for kind, save in kinds[repeat % 2:] + kinds[:repeat % 2]:
                directory = Path(scratch) / f"{kind}_{repeat}"
                result = save(directory, state, repeat + 1, async_save=kind == "async")
                if repeat:
                    runs[kind].append(result)
                    if kind == "sync":
                        restores.append(restore_once(directory, state, repeat + 1))
    blocked, sync_total = spread([r["blocked"] for r in runs["async"]]), spread([r["total"] for r in runs["sync"]])
    result = {
        "benchmark": "checkpoint_cost", "device": jax.devices()[0].device_kind, "cpu_count": os.cpu_count(),
        "jax": jax.__version__, "state_bytes": state_bytes, "leaves": len(jax.tree.leaves(state)), "repeats": repeats,
        "stack_layers": options.stack_layers,
        "async_blocked_seconds": blocked, "async_total_seconds": spread([r["total"] for r in runs["async"]]),
        "sync_seconds": sync_total, "restore_seconds": spread(restores),
        "blocked_over_sync": round(blocked["median"] / sync_total["median"], 4),
        "peak_added_over_state": {kind: round(max(r["peak_added_bytes"] for r in rows) / state_bytes, 3)
                                  for kind, rows in runs.items()},
        "load_average_1m": round(os.getloadavg()[0], 2),
    }
    print(f"state {state_bytes / 2**20:.0f} MiB in {result['leaves']} arrays, {repeats} repeats (median [min, max])")
    print(f"  async save blocks the loop {blocked['median']} s [{blocked['min']}, {blocked['max']}], "
          f"completes in {result['async_total_seconds']['median']} s")
    print(f"  sync save blocks {sync_total['median']} s; blocked / sync = {result['blocked_over_sync']}")
    print(f"  restore {result['restore_seconds']['median']} s; "
          f"peak RSS added / state: {result['peak_added_over_state']}")
    return emit(result, options.out)


if __name__ == "__main__":
    relaunch_like_the_command()
    main()
