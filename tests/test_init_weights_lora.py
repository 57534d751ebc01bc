"""`init_weights_from` a LoRA checkpoint: its adapters are copied in as arrays, so a run of another rank or scaling
(lora_alpha, lora_use_rslora) would start from another function than the source's. It is refused by field name,
before anything is built (it used to start without a word); other targets are left to the arrays (a target the
source lacks starts as a fresh adapter, which changes nothing). Adapters put onto another base than the one they
were trained on are warned about, naming both sources of the difference."""

from __future__ import annotations

import json
import logging
import shutil
from types import SimpleNamespace

import pytest

from easytrain import ArgumentError
from test_lora_trainer import lora_args, sft, write_base

SOURCE = dict(lora_dropout=0.0, lora_alpha=8, lora_target_modules=["q_proj", "v_proj"])


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory) -> SimpleNamespace:
    """A base and a LoRA run on it (rank 4, lora_alpha 8: scaling 2, q/v), checkpointed at step 2."""
    root = tmp_path_factory.mktemp("lora_source")
    base = write_base(root / "base")
    sft(lora_args(root / "run", base, max_steps=2, save_strategy="steps", save_steps=2, **SOURCE)).train()
    return SimpleNamespace(root=root, base=base, checkpoint=root / "run" / "checkpoints" / "2")


def start(lora_run, output_dir, base=None, source=None, **overrides):
    trainer = sft(lora_args(output_dir, base or lora_run.base, init_weights_from=str(source or lora_run.checkpoint),
                            **{**SOURCE, **overrides}))
    trainer.setup()
    return trainer


@pytest.mark.parametrize("overrides, field, old, new", [
    (dict(lora_alpha=32), "lora_alpha", "8.0", "32.0"),
    (dict(lora_use_rslora=True), "lora_use_rslora", "False", "True"),
], ids=["alpha", "rslora"])
def test_another_scaling_than_the_source_adapters_is_refused_by_field(lora_run, tmp_path, overrides, field, old,
                                                                      new):
    """Measured before: lora_alpha 32 started from the source's adapters under scaling 8 instead of 2."""
    with pytest.raises(ArgumentError) as error:
        start(lora_run, tmp_path, **overrides)
    message = error.value.message
    assert error.value.field == field, message
    assert f"{field}: checkpoint {old} vs now {new}" in message and "init_weights_from" in message, message
    assert "scaling 2 vs" in message


def test_a_source_saved_before_the_record_is_compared_by_its_arguments(lora_run, tmp_path):
    source = shutil.copytree(lora_run.root / "run", tmp_path / "old")
    metadata = source / "checkpoints" / "2" / "run_info" / "metadata"
    info = json.loads(metadata.read_text())
    del info["lora_config"]
    metadata.write_text(json.dumps(info))
    with pytest.raises(ArgumentError) as error:
        start(lora_run, tmp_path / "run", source=source, lora_alpha=32)
    assert error.value.field == "lora_alpha"


def test_the_same_scaling_starts_and_more_targets_start_as_fresh_adapters(lora_run, tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="easytrain"):
        trainer = start(lora_run, tmp_path / "same", lora_target_modules=["q_proj", "k_proj", "v_proj"])
    assert trainer.lora.scaling == 2.0
    assert not [r for r in caplog.records if "base" in r.getMessage()], "the same base: no warning"


def test_adapters_put_onto_another_base_are_warned_about(lora_run, tmp_path, caplog):
    """Measured before: the source's adapters went onto another base without a word."""
    other = write_base(tmp_path / "other_base", seed=1)
    with caplog.at_level(logging.WARNING, logger="easytrain"):
        start(lora_run, tmp_path / "run", base=other)
    warned = [r.getMessage() for r in caplog.records if "init_weights_from" in r.getMessage()]
    assert len(warned) == 1 and "another base" in warned[0] and "tensor(s) differ" in warned[0], warned


def _reuse_with_alpha(source, alpha: float) -> None:
    """The source's output_dir as another run with `alpha` left it (its run_info; the arrays need not change)."""
    metadata = source / "checkpoints" / "2" / "run_info" / "metadata"
    info = json.loads(metadata.read_text())
    info["arguments"]["lora_alpha"] = alpha
    info["lora_config"].update(alpha=alpha, scaling=alpha / info["lora_config"]["rank"])
    metadata.write_text(json.dumps(info))


def test_a_resume_is_not_compared_with_a_source_changed_since(lora_run, tmp_path):
    """The resume wins (docs/checkpoints.md): it continues its own adapters, so a source reused since with another
    lora_alpha is not compared. Measured before: the resume was refused ("lora_alpha: checkpoint 32.0 vs now 8.0"),
    and passing 32 was then refused by the resume's own check."""
    source = shutil.copytree(lora_run.root / "run", tmp_path / "source")
    run = dict(init_weights_from=str(source), save_strategy="steps", save_steps=2, **SOURCE)
    sft(lora_args(tmp_path / "run", lora_run.base, max_steps=2, **run)).train()
    _reuse_with_alpha(source, 32.0)
    with pytest.raises(ArgumentError, match="lora_alpha"):  # a fresh start still compares it
        sft(lora_args(tmp_path / "fresh", lora_run.base, max_steps=2, **run))
    trainer = sft(lora_args(tmp_path / "run", lora_run.base, max_steps=4, resume_from_checkpoint="latest", **run))
    assert int(trainer.state.step) == 2 and trainer.lora.scaling == 2.0


def test_a_source_stored_in_another_dtype_is_not_taken_for_another_base(lora_run, tmp_path, caplog):
    """The base fingerprint digests the stored bits: a float32 source's base and this bfloat16 run's differ in every
    tensor though model_name_or_path is the same. Measured before: "trained on another base than this run's (21 of 21
    tensor(s) differ ...) ... Pass the source run's model_name_or_path"."""
    with caplog.at_level(logging.INFO, logger="easytrain"):
        start(lora_run, tmp_path / "bf16", param_dtype="bfloat16")
    messages = [r.getMessage() for r in caplog.records if "init_weights_from" in r.getMessage()]
    assert not [m for m in messages if "another base" in m], messages
    assert [m for m in messages if "param_dtype" in m and "not compared" in m], messages
