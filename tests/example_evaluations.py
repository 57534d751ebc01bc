"""Run an example's `main(argv)` in this process and print its result as JSON with `evaluated`: for each evaluation,
in order, the trainer's class and the update its weights came from (`BaseTrainer.evaluate`, which the training
loop's evaluations call too). Usage: python tests/example_evaluations.py EXAMPLE.py [ARGS...]"""

from __future__ import annotations

import functools
import json
import sys
from pathlib import Path
from typing import Any

from easytrain.trainers.base import BaseTrainer
from script_modules import load_script


def recording(evaluated: list[list[Any]]):
    """`BaseTrainer.evaluate`, appending [trainer class, update] to `evaluated` at each call."""
    evaluate = BaseTrainer.evaluate

    @functools.wraps(evaluate)
    def recorded(self: BaseTrainer, *args: Any, **kwargs: Any) -> dict[str, float]:
        metrics = evaluate(self, *args, **kwargs)
        evaluated.append([type(self).__name__, int(self._state.step)])
        return metrics
    return recorded


if __name__ == "__main__":
    path, evaluated = Path(sys.argv[1]), []
    BaseTrainer.evaluate = recording(evaluated)
    result = load_script(path.stem, path).main(sys.argv[2:])
    print(json.dumps({**result, "evaluated": evaluated}))
