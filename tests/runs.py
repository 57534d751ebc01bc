"""Helpers shared by the tests that train: read a run's logged metrics, stop a run at a given step."""

import json
from pathlib import Path

from easytrain import Callback


def logged(output_dir, key: str = "loss", split: str = "train") -> dict[int, float]:
    """`step -> value` of one metric from a run's metrics.jsonl."""
    lines = [json.loads(line) for line in (Path(output_dir) / "metrics.jsonl").read_text().splitlines()]
    return {line["step"]: line[key] for line in lines if line["split"] == split and key in line}


class StopAt(Callback):
    """Ends training after `step` (the loop then checkpoints it, as a preempted run would)."""

    def __init__(self, step: int):
        self.step = step

    def on_step_end(self, trainer, step):
        if step == self.step:
            trainer.should_stop = True
