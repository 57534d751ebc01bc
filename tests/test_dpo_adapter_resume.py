"""DPO under LoRA started from a trained adapter (`lora_adapter_path`): its reference is the base with that adapter
as loaded, read again from the path on resume (not checkpointed). Other adapter values found there (the directory
re-written, or another one passed) are refused before any compute, naming the field, the digests of both and the
fix, instead of silently becoming another reference; the adapter the run started from resumes."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import jax
import pytest

from easytrain import ArgumentError, lora
from easytrain.models import from_pretrained
from easytrain.models.peft_io import save_peft_adapter
from easytrain.trainers.dpo import DPOArguments, DPOTrainer
from runs import StopAt, logged
from test_dpo_trainer import tiny_args
from test_lora_trainer import write_base


@pytest.fixture(scope="module")
def sources(tmp_path_factory) -> dict[str, Path]:
    """A base model and two adapters on it with different (non-zero) values."""
    root = tmp_path_factory.mktemp("sources")
    found = {"base": write_base(root / "base")}
    config = lora.LoRAConfig(rank=4, alpha=8)
    for seed, name in ((1, "a"), (2, "b")):
        model = lora.apply_lora(from_pretrained(found["base"]), config, rngs=seed)
        for module in lora.lora_modules(model).values():
            module.lora_b[...] = 0.3 * jax.random.normal(jax.random.key(seed), module.lora_b.shape)
        found[name] = save_peft_adapter(root / name, model, config)
    return found


def digests(message: str) -> list[str]:
    return re.findall(r"digest ([0-9a-f]{16})", message)


@pytest.mark.parametrize("precompute", [False, True])
def test_a_resume_refuses_other_adapter_values_at_lora_adapter_path(sources, tmp_path, precompute):
    """Measured before: the online resume ran on with adapter b's values as its reference, without a word (the
    precomputed one was refused as a change of model_name_or_path)."""
    adapter = shutil.copytree(sources["a"], tmp_path / "adapter")
    options = DPOArguments(precompute_ref_log_probs=precompute)
    common = dict(model_name_or_path=str(sources["base"]), lora_adapter_path=str(adapter), max_steps=2,
                  save_strategy="steps", save_steps=1)
    DPOTrainer(tiny_args(tmp_path, **common), options, callbacks=[StopAt(1)]).train()
    shutil.rmtree(adapter)
    shutil.copytree(sources["b"], adapter)  # the same path, re-written with other values
    resume = dict(common, resume_from_checkpoint="latest")
    for arguments in (resume, dict(resume, lora_adapter_path=str(sources["b"]))):  # and another directory
        with pytest.raises(ArgumentError) as error:
            DPOTrainer(tiny_args(tmp_path, **arguments), options).setup()
        message = error.value.message
        assert error.value.field == "lora_adapter_path", message
        assert f"{Path(arguments['lora_adapter_path']).absolute()}" in message and f"{adapter.absolute()}" in message
        assert len(set(digests(message))) == 2 and "start a new output_dir" in message
    shutil.rmtree(adapter)
    shutil.copytree(sources["a"], adapter)  # the adapter the run started from: resumes
    DPOTrainer(tiny_args(tmp_path, **resume), options).train()
    assert set(logged(tmp_path / "run")) == {1, 2}
