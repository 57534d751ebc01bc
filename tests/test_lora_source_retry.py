"""A LoRA run refused for its `init_weights_from` source (adapters of another scaling) is refused before anything is
written: the corrected command then starts in the same output_dir, with no lock, arguments.json or job.json of the
refused one in its way."""

from __future__ import annotations

import pytest

from easytrain import ArgumentError
from easytrain.cli import run
from test_init_weights_lora import SOURCE, lora_run  # noqa: F401 - the module's fixture
from test_lora_trainer import lora_args


def test_a_refused_lora_source_leaves_nothing_and_the_corrected_command_trains_there(lora_run, tmp_path):  # noqa: F811
    """Measured before: the refused start had created output_dir (empty) before the source was compared."""
    output_dir = tmp_path / "run"
    command = dict(task="sft", init_weights_from=str(lora_run.checkpoint), max_steps=2, save_strategy="steps",
                   save_steps=2, **SOURCE)
    with pytest.raises(ArgumentError, match="lora_alpha"):
        run(lora_args(output_dir, lora_run.base, **{**command, "lora_alpha": 32}))
    assert not output_dir.exists(), sorted(p.name for p in output_dir.iterdir())
    summary = run(lora_args(output_dir, lora_run.base, **command))
    assert summary["train_loss"] == summary["train_loss"]  # trained: a number, not NaN
    assert (output_dir / "checkpoints" / "2").is_dir() and (output_dir / "results.json").is_file()
