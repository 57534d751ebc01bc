"""A run's copy as a preempted run would have left it, for the DPO resume tests: one trainer fewer than training a
second run only to stop it."""

import shutil
from pathlib import Path


def stopped_copy(run, destination, step: int) -> Path:
    """A copy of the finished run directory `run` at `destination` without its checkpoints after `step`: what a run
    stopped at `step` (`StopAt`, a save step) would have left, the same checkpoint bit for bit (training is
    deterministic), so a resume there must continue as `run` went on. Its later metric records stay until the
    resume drops them (`truncate_jsonl`), as a killed run's would."""
    copy = Path(shutil.copytree(run, destination))
    later = [path for path in (copy / "checkpoints").iterdir() if path.name.isdigit() and int(path.name) > step]
    assert later, f"{run} has no checkpoint after step {step} to remove"
    for path in later:
        shutil.rmtree(path)
    assert (copy / "checkpoints" / str(step)).is_dir(), f"{run} has no checkpoint at step {step}"
    return copy
