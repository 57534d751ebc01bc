"""A LoRA run started with `init_weights_from` (a LoRA run's checkpoint, the base from `model_name_or_path`) resumes
from its own checkpoint and that base: the source's adapters, which the restore replaces, are not read again. So the
source removed since, or its output_dir reused with another rank, does not stop the resume (docs/checkpoints.md)."""

from __future__ import annotations

import shutil

from runs import StopAt, logged
from test_init_weights_lora import SOURCE, lora_run  # noqa: F401 (the fixture)
from test_lora_trainer import lora_args, sft


def _interrupted_and_straight(lora_run, tmp_path):  # noqa: F811
    """Run B from a copy of the source: once straight for 4 steps, once stopped (and checkpointed) at step 2."""
    source = shutil.copytree(lora_run.root / "run", tmp_path / "source")
    run = dict(init_weights_from=str(source), max_steps=4, save_strategy="steps", save_steps=2, **SOURCE)
    sft(lora_args(tmp_path / "straight", lora_run.base, **run)).train()
    sft(lora_args(tmp_path / "run", lora_run.base, **run), callbacks=[StopAt(2)]).train()
    assert max(logged(tmp_path / "run")) == 2
    return source, run


def _resumed(lora_run, tmp_path, run) -> None:  # noqa: F811
    sft(lora_args(tmp_path / "run", lora_run.base, resume_from_checkpoint="latest", **run)).train()
    assert logged(tmp_path / "run") == logged(tmp_path / "straight")
    assert len(logged(tmp_path / "straight")) == 4


def test_a_resume_does_not_read_a_source_removed_since(lora_run, tmp_path):  # noqa: F811
    """Measured before: "init_weights_from: ... is neither an exported model directory ... nor a run's checkpoint"."""
    source, run = _interrupted_and_straight(lora_run, tmp_path)
    shutil.rmtree(source)
    _resumed(lora_run, tmp_path, run)


def test_a_resume_does_not_read_a_source_reused_with_another_rank(lora_run, tmp_path):  # noqa: F811
    """Measured before: "... does not fit this model (8 tensor(s): ...lora_a: source (32, 8) vs model (32, 4) ..."."""
    source, run = _interrupted_and_straight(lora_run, tmp_path)
    sft(lora_args(source, lora_run.base, max_steps=2, save_strategy="steps", save_steps=2, lora_rank=8,
                  overwrite_output_dir=True, **SOURCE)).train()
    _resumed(lora_run, tmp_path, run)


def test_a_resume_reads_the_base_a_full_checkpoint_supplied(lora_run, tmp_path):  # noqa: F811
    """A full fine-tuning checkpoint gives a LoRA run its base in place of model_name_or_path's: the resume reads that
    base from it again (a restore does not hold the base), so it continues the same function."""
    sft(lora_args(tmp_path / "full", lora_run.base, lora_rank=0, lora_dropout=0.0, max_steps=2, save_strategy="steps",
                  save_steps=2)).train()
    run = dict(init_weights_from=str(tmp_path / "full"), max_steps=4, save_strategy="steps", save_steps=2, **SOURCE)
    sft(lora_args(tmp_path / "straight", lora_run.base, **run)).train()
    sft(lora_args(tmp_path / "run", lora_run.base, **run), callbacks=[StopAt(2)]).train()
    _resumed(lora_run, tmp_path, run)
