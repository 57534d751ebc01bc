"""What rematerialising the MLP's gated activation buys (`easytrain.models.gated`).

    python -m benchmarks.gated [--quick] [--rounds 24] [--steps 3] [--out FILE]

The `overhead` benchmark's model, blocks and AdamW. In one process (`benchmarks.step_forms`): the trainer's
compiled train step as it is (the activation `silu(gate) * up` under `jax.checkpoint`, keeping only its two
inputs for the backward pass) and the same step with the activation differentiated as written (JAX's derivative
keeps the sigmoid and the silu too), alternated round by round on the same batch. Reports the median
milliseconds per step of each, the paired median of the per-round speedups (as written / rematerialised), the
compiled kernels and scratch memory of each, and the first step's loss and gradient norm of each (the same to
rounding). Prints one JSON line.
"""

from __future__ import annotations

import os
from unittest import mock

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

from benchmarks.report import relaunch_like_the_command  # noqa: E402
from benchmarks.step_forms import compare, parse_options, unchanged  # noqa: E402
from easytrain.models import families, layers  # noqa: E402

SIDES = ("rematerialised", "as_written")


def as_written(name: str):
    """The gated activation differentiated as written: what `easytrain.models.gated` replaced."""
    activation = families.ACTIVATIONS[name]
    return lambda gate, up: activation(gate) * up


def main(argv: list[str] | None = None) -> dict:
    forms = {"rematerialised": unchanged,
             "as_written": lambda: mock.patch.object(layers, "gated_activation", as_written)}
    return compare("gated", forms, parse_options(__doc__, argv))


if __name__ == "__main__":
    relaunch_like_the_command()
    main()
