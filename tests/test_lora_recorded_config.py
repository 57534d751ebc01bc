"""The LoRA config a run trains with is recorded in each checkpoint's run_info and compared on resume, whichever route
set it: the `lora_*` arguments, or `lora_adapter_path`'s adapter_config.json, which is read again at every start.
Another adapter directory, or the same one rewritten with another lora_alpha / use_rslora / lora_dropout, is refused
before the state is restored, naming lora_adapter_path, the changed field with both values and the fix (it used to
resume silently with another scaling, or fail blaming the optimizer). A checkpoint written before the record resumes
as before."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import jax
import pytest

from easytrain import ArgumentError, TrainingArguments, lora
from easytrain.models import from_pretrained
from easytrain.models.peft_io import save_peft_adapter
from easytrain.trainers.dpo import DPOTrainer
from easytrain.trainers.lora_record import LORA_CONFIG_KEY, config_record
from easytrain.trainers.resume_checks import check_resumable
from test_dpo_trainer import tiny_args
from test_lora_trainer import lora_args, sft, write_base

RESUME = dict(max_steps=4, resume_from_checkpoint="latest", save_strategy="steps", save_steps=2)


def rewritten(adapter: Path, target: Path, **fields) -> Path:
    """A copy of `adapter` (or `adapter` itself when `target` is it) whose adapter_config.json has `fields`."""
    if target != adapter:
        shutil.copytree(adapter, target)
    path = target / "adapter_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **fields}))
    return target


@pytest.fixture(scope="module")
def adapter_run(tmp_path_factory) -> SimpleNamespace:
    """A base, a trained-looking adapter on it (rank 4, lora_alpha 8: scaling 2) and an SFT run started from that
    adapter, checkpointed at step 2."""
    root = tmp_path_factory.mktemp("adapter_run")
    base = write_base(root / "base")
    config = lora.LoRAConfig(rank=4, alpha=8, target_modules=("q_proj", "v_proj"))
    model = lora.apply_lora(from_pretrained(base), config, rngs=3)
    for module in lora.lora_modules(model).values():
        module.lora_b[...] = 0.3 * jax.random.normal(jax.random.key(1), module.lora_b.shape)
    adapter = save_peft_adapter(root / "adapter", model, config)
    common = dict(lora_rank=0, lora_dropout=0.0, lora_adapter_path=str(adapter))
    sft(lora_args(root / "run", base, max_steps=2, save_strategy="steps", save_steps=2, **common)).train()
    return SimpleNamespace(root=root, base=base, adapter=adapter, common=common)


def resume_sft(run: SimpleNamespace, output_dir: Path | None = None, **overrides):
    trainer = sft(lora_args(output_dir or run.root / "run", run.base, **{**run.common, **RESUME, **overrides}))
    trainer.setup()
    return trainer


def test_the_checkpoint_records_the_adapter_config_in_use(adapter_run):
    info = json.loads((adapter_run.root / "run" / "checkpoints" / "2" / "run_info" / "metadata").read_text())
    recorded = info[LORA_CONFIG_KEY]
    assert recorded["source"] == "lora_adapter_path"
    assert (recorded["rank"], recorded["alpha"], recorded["use_rslora"], recorded["dropout"]) == (4, 8.0, False, 0.0)
    assert sorted(recorded["target_modules"]) == ["q_proj", "v_proj"] and recorded["scaling"] == 2.0


@pytest.mark.parametrize("fields, named, old, new", [
    (dict(lora_alpha=64, use_rslora=True), "lora_alpha", "8.0", "64.0"),
    (dict(lora_dropout=0.1), "lora_dropout", "0.0", "0.1"),
], ids=["alpha and rslora", "dropout"])
def test_another_adapter_directory_with_another_config_is_refused_naming_lora_adapter_path(
        adapter_run, tmp_path, fields, named, old, new):
    """Measured before: alpha 64 with rslora resumed with scaling 32.0 instead of 2.0 (logits moved 0.2); dropout 0.1
    failed as a CheckpointMismatchError blaming another optimizer, param_dtype or model."""
    other = rewritten(adapter_run.adapter, tmp_path / "other", **fields)
    with pytest.raises(ArgumentError) as error:
        resume_sft(adapter_run, lora_adapter_path=str(other))
    message = error.value.message
    assert error.value.field == "lora_adapter_path", message
    assert named in message and f"checkpoint {old}" in message and f"now {new}" in message, message
    assert str(other) in message and "start a new output_dir" in message


def test_the_same_adapter_directory_rewritten_is_refused_and_restored_resumes(adapter_run, tmp_path):
    """Measured before: lora_alpha 8 -> 2 in the run's own adapter directory resumed with scaling 0.5."""
    run_dir = shutil.copytree(adapter_run.root / "run", tmp_path / "run")
    original = (adapter_run.adapter / "adapter_config.json").read_text()
    try:
        rewritten(adapter_run.adapter, adapter_run.adapter, lora_alpha=2)
        with pytest.raises(ArgumentError, match=r"lora_alpha: checkpoint 8.0 vs now 2.0") as error:
            resume_sft(adapter_run, run_dir)
        assert error.value.field == "lora_adapter_path" and "scaling" in error.value.message
    finally:
        (adapter_run.adapter / "adapter_config.json").write_text(original)
    assert resume_sft(adapter_run, run_dir).lora.alpha == 8


def test_a_checkpoint_without_the_record_resumes_as_before(adapter_run, tmp_path):
    run_dir = shutil.copytree(adapter_run.root / "run", tmp_path / "run")
    metadata = run_dir / "checkpoints" / "2" / "run_info" / "metadata"
    info = json.loads(metadata.read_text())
    del info[LORA_CONFIG_KEY]
    metadata.write_text(json.dumps(info))
    assert resume_sft(adapter_run, run_dir).lora.scaling == 2.0


def test_a_dpo_resume_refuses_the_adapter_rewritten_with_another_alpha(adapter_run, tmp_path):
    """Measured before: the policy and its initial-policy reference both resumed under scaling 16 (logits moved
    0.43), the adapter's tensors being unchanged."""
    adapter = shutil.copytree(adapter_run.adapter, tmp_path / "adapter")
    common = dict(model_name_or_path=str(adapter_run.base), lora_adapter_path=str(adapter), max_steps=2,
                  save_strategy="steps", save_steps=2)
    DPOTrainer(tiny_args(tmp_path, **common)).train()
    rewritten(adapter, adapter, lora_alpha=64)
    with pytest.raises(ArgumentError) as error:
        DPOTrainer(tiny_args(tmp_path, **dict(common, max_steps=4, resume_from_checkpoint="latest"))).setup()
    assert error.value.field == "lora_adapter_path"
    assert "lora_alpha: checkpoint 8.0 vs now 64.0" in error.value.message, error.value.message


def info_with(arguments: TrainingArguments, config: lora.LoRAConfig, adapter_path: str | None = None) -> dict:
    return {"format_version": 1, "arguments": arguments.to_dict(), "model_config": None,
            LORA_CONFIG_KEY: config_record(config, adapter_path)}


def test_a_run_started_from_an_adapter_resumed_with_flags_of_another_config_names_the_flag(tmp_path):
    adapter_run = TrainingArguments(output_dir=str(tmp_path), lora_adapter_path=str(tmp_path / "adapter"))
    flags = TrainingArguments(output_dir=str(tmp_path), lora_rank=4, lora_alpha=16, resume_from_checkpoint="latest")
    stored = info_with(adapter_run, lora.LoRAConfig(rank=4, alpha=8), str(tmp_path / "adapter"))
    with pytest.raises(ArgumentError, match=r"lora_alpha: checkpoint 8.0 vs now 16.0.*lora_adapter_path") as error:
        check_resumable(stored, info_with(flags, lora.LoRAConfig(rank=4, alpha=16)))
    assert error.value.field == "lora_alpha"
    same = TrainingArguments(output_dir=str(tmp_path), lora_rank=4, lora_alpha=8, resume_from_checkpoint="latest")
    assert check_resumable(stored, info_with(same, lora.LoRAConfig(rank=4, alpha=8))) == []


def test_precomputed_reference_log_probs_are_not_reused_under_another_adapter_scaling(adapter_run, tmp_path):
    """The cache (kept by overwrite_output_dir) is keyed by the reference's tensors; an adapter rewritten with another
    lora_alpha has the same tensors. Measured before: its log-probs, computed under scaling 2, were read under 16."""
    from easytrain.trainers.dpo import DPOArguments

    adapter = shutil.copytree(adapter_run.adapter, tmp_path / "adapter")
    common = dict(model_name_or_path=str(adapter_run.base), lora_adapter_path=str(adapter), max_steps=1)
    options = DPOArguments(precompute_ref_log_probs=True)
    DPOTrainer(tiny_args(tmp_path, **common), options).setup()
    again = DPOTrainer(tiny_args(tmp_path, overwrite_output_dir=True, **common), options)
    again.setup()
    assert again.reference_logps_cached["train"], "the same reference reads its cache"
    rewritten(adapter, adapter, lora_alpha=64)
    other = DPOTrainer(tiny_args(tmp_path, overwrite_output_dir=True, **common), options)
    other.setup()
    assert not other.reference_logps_cached["train"]


@pytest.mark.parametrize("content", [None, "{not json"], ids=["absent", "damaged"])
def test_an_adapter_directory_without_a_readable_config_is_refused_naming_lora_adapter_path(tmp_path, content):
    """The reader's error named the file but not the argument that pointed there."""
    (adapter := tmp_path / "adapter").mkdir()
    if content is not None:
        (adapter / "adapter_config.json").write_text(content)
    with pytest.raises(ArgumentError, match=r"^lora_adapter_path: .*adapter_config\.json"):
        DPOTrainer(tiny_args(tmp_path / "run", lora_adapter_path=str(adapter)))
    assert not (tmp_path / "run").exists()
