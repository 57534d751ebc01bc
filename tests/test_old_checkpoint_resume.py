"""Checkpoints written before a record or a layout changed still resume, or are refused by name before any array is
read: a full fine-tuning run whose arguments hold a `lora_*` field, a run of several updates per step saved without
its `saved_at` record, and a LoRA run whose trained-in-full head also held an adapter."""

import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import jax.numpy as jnp
import pytest

from easytrain import ArgumentError, BaseTrainer, TrainingArguments
from easytrain.checkpoint import SAVED_AT, CheckpointManager
from easytrain.errors import CheckpointReadError
from easytrain.trainers.resume import check_restored_step
from easytrain.trainers.restore_checks import check_head_adapter_layout
from easytrain.trainers.resume_checks import DEFAULT_OPTIMIZER_KEY, check_resumable
from runs import StopAt, args_for
from test_resume_inputs import resume
from test_several_updates_resume import TwoUpdatesPerBatch, two_update_args


def made_old(step_dir: Path) -> None:
    """`step_dir` as easytrain wrote it before the `saved_at` and `default_optimizer` records."""
    for item, key in (("progress", SAVED_AT), ("run_info", DEFAULT_OPTIMIZER_KEY)):
        metadata = step_dir / item / "metadata"
        values = json.loads(metadata.read_text())
        del values[key]
        metadata.write_text(json.dumps(values))


def stored(arguments: TrainingArguments) -> dict:
    return {"format_version": 1, "arguments": arguments.to_dict(), "model_config": None}


def now(arguments: TrainingArguments) -> dict:
    return {"arguments": arguments.to_dict(), "model_config": None}


def test_a_full_fine_tuning_checkpoint_with_a_lora_field_resumes(tmp_path):
    """Saved before lora_* fields without lora_rank were refused: resumed from its own arguments.json, or without the
    field."""
    old = TrainingArguments(output_dir=str(tmp_path), lora_alpha=32.0, resume_from_checkpoint="latest")
    without = TrainingArguments(output_dir=str(tmp_path), resume_from_checkpoint="latest")
    assert check_resumable(stored(old), now(old)) == []
    assert check_resumable(stored(old), now(without)) == []


def test_a_lora_field_new_on_a_full_fine_tuning_resume_has_no_effect(tmp_path):
    before = TrainingArguments(output_dir=str(tmp_path))
    given = TrainingArguments(output_dir=str(tmp_path), lora_alpha=32.0, resume_from_checkpoint="latest")
    with pytest.raises(ArgumentError, match=r"lora_alpha=32.0 given, but lora_rank is 0.*no effect.*drop "
                                            r"--lora_alpha to resume it") as error:
        check_resumable(stored(before), now(given))
    assert error.value.field == "lora_alpha"


def test_a_lora_checkpoint_resumed_without_lora_rank_names_lora_rank(tmp_path):
    lora = TrainingArguments(output_dir=str(tmp_path), lora_rank=4, lora_dropout=0.05)
    forgotten = TrainingArguments(output_dir=str(tmp_path), lora_dropout=0.05, resume_from_checkpoint="latest")
    with pytest.raises(ArgumentError, match=r"lora_rank: checkpoint 4 vs now 0") as error:
        check_resumable(stored(lora), now(forgotten))
    assert error.value.field == "lora_rank"
    with pytest.raises(ArgumentError, match=r"lora_dropout=0.05 given, but lora_rank is 0"):
        TrainingArguments(output_dir=str(tmp_path), lora_dropout=0.05)  # a fresh run is still refused


def test_an_old_checkpoint_of_two_updates_per_step_resumes(tmp_path):
    run = tmp_path / "run"
    TwoUpdatesPerBatch(two_update_args(run), callbacks=[StopAt(2)]).train()
    made_old(run / "checkpoints" / "2")
    resumed = TwoUpdatesPerBatch(two_update_args(run, resume_from_checkpoint="latest"))
    resumed.setup()
    assert int(resumed.state.step) == 4


def test_a_renamed_old_checkpoint_is_still_refused(run_copy):
    checkpoints = run_copy / "checkpoints"
    shutil.rmtree(checkpoints / "4")
    (checkpoints / "2").rename(checkpoints / "4")
    made_old(checkpoints / "4")
    with pytest.raises(CheckpointReadError, match=r"data_state records step 2, but this is the checkpoint of step 4"):
        resume(run_copy).setup()


def test_an_old_record_allows_several_updates_per_step():
    check_restored_step(SimpleNamespace(step=jnp.asarray(8)), 4)
    with pytest.raises(ValueError, match=r"train state is at step 3, but this is the checkpoint of step 4"):
        check_restored_step(SimpleNamespace(step=jnp.asarray(3)), 4)


def test_the_saved_update_count_is_read_before_any_array(run_copy, monkeypatch):
    progress = run_copy / "checkpoints" / "4" / "progress" / "metadata"
    values = json.loads(progress.read_text())
    progress.write_text(json.dumps({**values, SAVED_AT: {**values[SAVED_AT], "step": 2}}))
    restored = []
    monkeypatch.setattr(CheckpointManager, "restore", lambda *args, **kwargs: restored.append(args))
    with pytest.raises(CheckpointReadError, match=r"progress records step 2, but this is the checkpoint of step 4"):
        resume(run_copy).setup()
    assert restored == []


HEAD_LORA = dict(lora_rank=4, lora_target_modules=["q_proj", "lm_head"], lora_train_embeddings=True)


def test_an_old_lora_checkpoint_with_an_adapted_head_is_refused_by_name(tmp_path, monkeypatch):
    """Written as before the head trained in full took no adapter (PEFT's modules_to_save)."""
    import easytrain.lora

    run = tmp_path / "run"
    with monkeypatch.context() as old_layout:
        old_layout.setattr(easytrain.lora, "_without_saved_modules", lambda chosen, config: chosen)
        BaseTrainer(args_for(run, max_steps=2, **HEAD_LORA)).train()
    made_old(run / "checkpoints" / "2")
    restored = []
    monkeypatch.setattr(CheckpointManager, "restore", lambda *args, **kwargs: restored.append(args))
    with pytest.raises(ArgumentError, match=r"adapted lm_head.*lora_train_embeddings.*modules_to_save.*cannot be "
                                            r"resumed here.*--init_weights_from") as error:
        BaseTrainer(args_for(run, resume_from_checkpoint="latest", **HEAD_LORA)).setup()
    assert error.value.field == "lora_target_modules" and restored == []


def test_the_head_layouts_easytrain_writes_now_pass():
    adapters = {"params.layers.0.self_attn.q_proj.lora_a", "params.layers.0.self_attn.q_proj.lora_b"}
    in_full = {"params.lm_head.kernel", "params.embed_tokens.embedding"}
    check_head_adapter_layout({"lora_rank": 4, "lora_train_embeddings": True}, adapters | in_full)
    head_adapter = {"params.lm_head.lora_a", "params.lm_head.lora_b"}
    check_head_adapter_layout({"lora_rank": 4, "lora_train_embeddings": False}, adapters | head_adapter)
    with pytest.raises(ArgumentError, match=r"adapted lm_head"):
        check_head_adapter_layout({"lora_rank": 4, "lora_train_embeddings": True}, adapters | in_full | head_adapter)
