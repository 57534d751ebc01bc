"""Checkpoints and exports written by older easytrain commits (tests/golden/<date>-<commit>/, written by
tests/golden/write_golden.py from a checkout of that commit) still resume and load with the current code: each
run's step-2 checkpoint (a plain language model's, an SFT run's of LoRA adapters, a DPO run's) resumes at step 3
and logs the losses the old code's unbroken 6-step run logged, and each export's logits are the ones the old code
computed."""

import base64
import json
import shutil

import numpy as np
import pytest

from easytrain import Callback, TrainingArguments
from easytrain.models import from_pretrained

from golden.write_golden import HERE as GOLDEN
from golden.write_golden import PROBE_IDS, PROBE_MASK, arguments, trainer_class, workspace

RUNS = sorted(path.name for path in GOLDEN.iterdir() if (path / "expected.json").is_file())
EXPORTS = [name for name in RUNS if (GOLDEN / name / "export").is_dir()]


class Losses(Callback):
    """`step -> loss` of every step this run logs itself."""

    def __init__(self):
        self.losses: dict[str, float] = {}

    def on_log(self, trainer, step, logs):
        if "loss" in logs:
            self.losses[str(step)] = float(logs["loss"])


def expected(name: str) -> dict:
    return json.loads((GOLDEN / name / "expected.json").read_text())


def test_the_goldens_are_found():
    """An empty or misnamed folder would leave the tests below with no case to run."""
    assert len(RUNS) >= 4 and len(EXPORTS) >= 2, RUNS


@pytest.mark.parametrize("name", RUNS)
def test_a_golden_checkpoint_resumes_with_the_old_runs_losses(name, tmp_path, monkeypatch):
    """Bit-equal on the machine type they were written on (Intel Xeon); a few float32 ulps are allowed for a CPU whose
    XLA code sums in another order. A data position one batch off moved them by 0.9%."""
    monkeypatch.chdir(workspace(tmp_path))
    shutil.copytree(GOLDEN / name / "run", "run")
    recorded, kind = Losses(), expected(name).get("kind", "lm")
    trainer_class(kind)(TrainingArguments(**arguments("run", max_steps=6, kind=kind, resume_from_checkpoint="latest")),
                        callbacks=[recorded]).train()
    unbroken = expected(name)["unbroken_losses"]
    assert list(recorded.losses) == ["3", "4", "5", "6"]
    np.testing.assert_allclose([recorded.losses[step] for step in recorded.losses],
                               [unbroken[step] for step in recorded.losses], rtol=1e-6, atol=0)


@pytest.mark.parametrize("name", EXPORTS)
def test_a_golden_export_loads_with_the_old_codes_logits(name):
    model = from_pretrained(GOLDEN / name / "export")
    logits = np.asarray(model(np.asarray(PROBE_IDS), attention_mask_BT=np.asarray(PROBE_MASK)), dtype=np.float32)
    old = np.frombuffer(base64.b64decode(expected(name)["probe_logits"]), dtype="<f4").reshape(logits.shape)
    np.testing.assert_allclose(logits, old, rtol=0, atol=1e-6)
