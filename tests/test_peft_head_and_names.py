"""PEFT's rules at the edges of LoRA: a fully trained output head takes no adapter (PEFT's `modules_to_save` beats
`target_modules`), so LoRA on `lm_head` with `train_embeddings` exports what PEFT computes and loads back; an
adapter's target name the model lacks is ignored on load, as PEFT ignores it; a tied model's refusal says which
copy PEFT trained."""

from __future__ import annotations

import json
import logging
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import pytest

from easytrain import lora
from easytrain.lora import LoRAConfig, LoRAConfigError
from easytrain.models import CheckpointError, from_pretrained
from easytrain.models.peft_io import ADAPTER_CONFIG_NAME, load_peft_adapter

import peft_fixtures
from lora_models import ids_batch, logits, randomise_adapters, torch_logits, torch_model
from peft_fixtures import change_fully_trained, check_peft_round_trip, moved_peft_model, peft_adapter

llama_dir = peft_fixtures.llama_dir  # module-scoped fixtures: the randomised bases
qwen3_dir = peft_fixtures.qwen3_dir


@pytest.mark.parametrize("targets", [["q_proj", "lm_head"], r"model\.layers\.\d+\.self_attn\.q_proj|lm_head"])
def test_lora_on_the_head_with_train_embeddings_exports_what_peft_computes(targets, llama_dir, tmp_path, caplog):
    peft = pytest.importorskip("peft")
    config = LoRAConfig(rank=4, alpha=8, target_modules=targets, train_embeddings=True)
    with caplog.at_level(logging.INFO, logger="easytrain"):
        model = lora.apply_lora(from_pretrained(llama_dir), config)
    randomise_adapters(model, 2)
    change_fully_trained(model, config)  # the embedding and the head trained in full
    check_peft_round_trip(peft, model, config, llama_dir, ids_batch(1), tmp_path)
    assert "lm_head" not in lora.lora_modules(model) and len(lora.lora_modules(model)) == 2  # PEFT's layout
    assert "lm_head" in caplog.text and "train_embeddings" in caplog.text


def test_a_peft_adapter_that_saves_a_targeted_head_loads_with_its_logits(llama_dir, tmp_path):
    """PEFT itself skips the adapter of a target that `modules_to_save` also names."""
    peft_model = moved_peft_model(llama_dir, lora_alpha=8, scale=0.1, target_modules=["q_proj", "lm_head"],
                                  modules_to_save=["embed_tokens", "lm_head"])
    peft_model.save_pretrained(tmp_path / "adapter")
    expected = torch_logits(peft_model.eval(), ids_batch(3))
    assert np.abs(expected - torch_logits(torch_model(llama_dir), ids_batch(3))).max() > 1e-2  # the adapter moved it
    model = load_peft_adapter(tmp_path / "adapter", from_pretrained(llama_dir))
    assert np.abs(logits(model, ids_batch(3)) - expected).max() <= 1e-4


def test_targets_that_are_only_the_trained_head_are_refused_naming_both_fields(llama_dir):
    with pytest.raises(LoRAConfigError, match="train_embeddings") as error:
        lora.apply_lora(from_pretrained(llama_dir), LoRAConfig(rank=4, target_modules=["lm_head"],
                                                                train_embeddings=True))
    assert error.value.field == "target_modules"


def test_an_adapter_target_the_model_lacks_is_ignored_as_peft_ignores_it(llama_dir, tmp_path, caplog):
    peft_model = moved_peft_model(llama_dir, lora_alpha=8, scale=0.1, target_modules=["q_proj", "v_proj", "c_attn"])
    peft_model.save_pretrained(tmp_path / "adapter")
    expected = torch_logits(peft_model.eval(), ids_batch(3))
    assert np.abs(expected - torch_logits(torch_model(llama_dir), ids_batch(3))).max() > 1e-2
    with caplog.at_level(logging.INFO, logger="easytrain"):
        model = load_peft_adapter(tmp_path / "adapter", from_pretrained(llama_dir))
    assert np.abs(logits(model, ids_batch(3)) - expected).max() <= 1e-4
    assert "c_attn" in caplog.text
    config_path = tmp_path / "adapter" / ADAPTER_CONFIG_NAME
    config_path.write_text(json.dumps({**json.loads(config_path.read_text()), "target_modules": ["c_attn"]}))
    with pytest.raises(CheckpointError, match="c_attn.*match no dense layer"):  # PEFT refuses this one too
        load_peft_adapter(tmp_path / "adapter", from_pretrained(llama_dir))
    with pytest.raises(LoRAConfigError, match="c_attn"):  # names a user gives are still checked
        lora.apply_lora(from_pretrained(llama_dir), LoRAConfig(rank=4, target_modules=["q_proj", "c_attn"]))


@pytest.mark.parametrize("saved, trained, kept", [(["lm_head"], "output head", "input embedding"),
                                                  (["embed_tokens"], "input embedding", "output head")])
def test_a_tied_model_whose_embedding_peft_untied_is_refused_saying_which_copy_trained(saved, trained, kept,
                                                                                         qwen3_dir, tmp_path):
    adapter = peft_adapter(qwen3_dir, tmp_path / "adapter", target_modules=["q_proj"], modules_to_save=saved)
    with pytest.raises(CheckpointError, match="ensure_weight_tying") as error:
        load_peft_adapter(adapter, from_pretrained(qwen3_dir))
    message = str(error.value)
    assert f"trained copy to the {trained} only" in message and f"keeps the base matrix as {kept}" in message
