"""LoRA adapters in and out of PEFT: merged exports for transformers, adapters saved by easytrain loaded by PEFT
and adapters trained in PEFT loaded by easytrain with the same logits, and refusals by name.

Reference behaviour comes from transformers + PEFT in PyTorch (the `peft` test extra).
"""

import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import pytest
from flax import nnx

from easytrain import lora
from easytrain.lora import LoRAConfig
from easytrain.models import CheckpointError, from_pretrained, save_pretrained
from easytrain.models.peft_io import ADAPTER_CONFIG_NAME, load_peft_adapter, read_peft_config, save_peft_adapter

import peft_fixtures
from lora_models import LLAMA, ids_batch, logits, randomise_adapters, torch_logits, torch_model, write_base
from peft_fixtures import change_fully_trained, check_peft_round_trip, moved_peft_model, peft_adapter, peft_names

llama_dir = peft_fixtures.llama_dir  # module-scoped fixtures: the randomised bases
qwen3_dir = peft_fixtures.qwen3_dir


def test_merged_model_exports_for_transformers_with_the_adapted_logits(llama_dir, tmp_path):
    model = lora.apply_lora(from_pretrained(llama_dir), LoRAConfig(rank=4, alpha=16, target_modules=r".*_proj"))
    randomise_adapters(model)
    ids = ids_batch(1)
    adapted = logits(model, ids)
    assert np.abs(adapted - logits(from_pretrained(llama_dir), ids)).max() > 1e-2
    with pytest.raises(CheckpointError):  # unmerged adapters have no transformers name
        save_pretrained(tmp_path / "unmerged", model, model.config)
    merged = lora.merge_lora(model)
    assert not lora.lora_modules(merged) and not nnx.state(merged, nnx.LoRAParam)
    assert len(lora.lora_modules(model)) == 14  # the trained model keeps its adapters
    assert model.layers[0].mlp.up_proj.kernel.get_value() is not merged.layers[0].mlp.up_proj.kernel.get_value()
    assert merged.embed_tokens.embedding.get_value() is model.embed_tokens.embedding.get_value()  # shared
    save_pretrained(tmp_path / "merged", merged, merged.config)
    reference = torch_logits(torch_model(tmp_path / "merged"), ids)
    assert np.abs(reference - adapted).max() <= 1e-4


EXPORTS = {
    "llama, names": ("llama", dict(rank=4, alpha=8, target_modules=["q_proj", "v_proj", "o_proj", "down_proj"])),
    "qwen3 tied, regex, rslora, embeddings and norms": (
        "qwen3", dict(rank=2, alpha=4, use_rslora=True, target_modules=r"model\.layers\.\d+\.(self_attn|mlp)\.\w+_proj",
                      train_embeddings=True, train_norms=True)),
}


@pytest.mark.parametrize("case", EXPORTS)
def test_adapter_saved_by_easytrain_loads_in_peft_with_the_same_logits(case, llama_dir, qwen3_dir, tmp_path):
    peft = pytest.importorskip("peft")
    base_dir = {"llama": llama_dir, "qwen3": qwen3_dir}[EXPORTS[case][0]]
    config = LoRAConfig(**EXPORTS[case][1])
    model = lora.apply_lora(from_pretrained(base_dir), config, rngs=5)
    randomise_adapters(model)
    if config.train_embeddings or config.train_norms:  # the fully trained modules changed too
        change_fully_trained(model, config)
    check_peft_round_trip(peft, model, config, base_dir, ids_batch(2), tmp_path)


IMPORTS = {
    "llama, names": ("llama", dict(target_modules=["q_proj", "k_proj", "up_proj"])),
    "llama, regex, rslora, dropout": ("llama", dict(target_modules=r"model\.layers\.1\.(self_attn\.o|mlp\.gate)_proj",
                                                    use_rslora=True, lora_dropout=0.1)),
    "llama, lm_head and every norm": ("llama", dict(target_modules=["v_proj", "lm_head"], modules_to_save=["norm"])),
    "llama, embeddings and norms": ("llama", dict(target_modules=["q_proj"], modules_to_save=[
        "embed_tokens", "lm_head", "input_layernorm", "post_attention_layernorm", "model.norm"])),
    "llama, eva init": ("llama", dict(target_modules=["q_proj"], init_lora_weights="eva")),
    "llama, orthogonal init": ("llama", dict(target_modules=["k_proj"], init_lora_weights="orthogonal")),
    "qwen3 tied, all-linear": ("qwen3", dict(target_modules="all-linear")),
    "qwen3 tied, embeddings tied": ("qwen3", dict(target_modules=["o_proj"], modules_to_save=["embed_tokens", "norm"],
                                                  ensure_weight_tying=True)),
}


@pytest.mark.parametrize("case", IMPORTS)
def test_adapter_trained_in_peft_loads_into_easytrain_with_the_same_logits(case, llama_dir, qwen3_dir, tmp_path):
    family, fields = IMPORTS[case]
    base_dir = {"llama": llama_dir, "qwen3": qwen3_dir}[family]
    peft_model = moved_peft_model(base_dir, lora_alpha=12, scale=0.1, **fields)
    peft_model.save_pretrained(tmp_path / "adapter")
    ids = ids_batch(3)
    expected = torch_logits(peft_model.eval(), ids)
    assert np.abs(expected - torch_logits(torch_model(base_dir), ids)).max() > 1e-2
    model = load_peft_adapter(tmp_path / "adapter", from_pretrained(base_dir))
    assert np.abs(logits(model, ids) - expected).max() <= 1e-4
    stored = {k.rsplit(".lora_", 1)[0] for k in peft_names(tmp_path / "adapter") if ".lora_" in k}
    assert {"base_model.model." + name for name in lora.lora_modules(model)} == stored


def test_unsupported_or_mismatched_adapters_are_refused_by_name(llama_dir, qwen3_dir, tmp_path):
    model = lora.apply_lora(from_pretrained(llama_dir), LoRAConfig(rank=4, alpha=8, target_modules=["q_proj"]))
    save_peft_adapter(tmp_path / "adapter", model, LoRAConfig(rank=4, alpha=8, target_modules=["q_proj"]))
    config_path = tmp_path / "adapter" / ADAPTER_CONFIG_NAME
    original = json.loads(config_path.read_text())
    for field, value in (("use_dora", True), ("rank_pattern", {"q_proj": 8}), ("bias", "all"),
                         ("peft_type", "IA3")):
        config_path.write_text(json.dumps({**original, field: value}))
        with pytest.raises(CheckpointError, match=field):
            load_peft_adapter(tmp_path / "adapter", from_pretrained(llama_dir))
    config_path.write_text(json.dumps({**original, "target_modules": ["q_proj", "v_proj"]}))
    with pytest.raises(CheckpointError, match=r"missing \(4\).*v_proj"):
        load_peft_adapter(tmp_path / "adapter", from_pretrained(llama_dir))
    config_path.write_text(json.dumps(original))
    qwen3 = from_pretrained(qwen3_dir)
    with pytest.raises(CheckpointError, match="shape mismatch"):  # the hidden sizes differ
        load_peft_adapter(tmp_path / "adapter", qwen3)
    assert not lora.lora_modules(qwen3)  # checked before the model is touched
    other_base = write_base(tmp_path / "other_base", LLAMA, seed=7)
    with pytest.raises(CheckpointError, match="base weights differ"):
        load_peft_adapter(tmp_path / "adapter", from_pretrained(other_base), verify_base=True)
    load_peft_adapter(tmp_path / "adapter", from_pretrained(other_base))  # unchecked by default
    with pytest.raises(CheckpointError, match="rank=8"):
        save_peft_adapter(tmp_path / "wrong", model, LoRAConfig(rank=8, alpha=8, target_modules=["q_proj"]))


@pytest.mark.parametrize("init", ["pissa", "pissa_niter_2", "olora"])
def test_adapters_made_on_a_rewritten_base_are_refused_and_their_conversion_loads(init, llama_dir, tmp_path):
    """PiSSA/OLoRA subtract the initial adapter from the base weights: on the original base they are wrong."""
    peft = pytest.importorskip("peft")
    import torch

    torch.manual_seed(0)
    peft_model = peft.get_peft_model(torch_model(llama_dir), peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=init))
    peft_model.peft_config["default"].init_lora_weights = True  # PEFT's recipe: the initial adapter, as plain LoRA
    peft_model.save_pretrained(tmp_path / "initial")
    peft_model.peft_config["default"].init_lora_weights = init
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_" in name:
                param.add_(0.05 * torch.randn_like(param))
    expected = torch_logits(peft_model.eval(), ids_batch(3))
    peft_model.save_pretrained(tmp_path / "adapter")
    with pytest.raises(CheckpointError, match=rf"init_lora_weights='{init}'.*path_initial_model_for_weight_conversion"):
        load_peft_adapter(tmp_path / "adapter", from_pretrained(llama_dir))
    # The way out the message gives: converted to a plain LoRA adapter (rank 2r) on the original base.
    peft_model.save_pretrained(tmp_path / "converted",
                               path_initial_model_for_weight_conversion=str(tmp_path / "initial"))
    converted = load_peft_adapter(tmp_path / "converted", from_pretrained(llama_dir))
    assert np.abs(logits(converted, ids_batch(3)) - expected).max() <= 1e-4


def test_other_initialisations_that_change_the_base_or_the_training_are_refused(llama_dir, tmp_path):
    model = lora.apply_lora(from_pretrained(llama_dir), LoRAConfig(rank=4, alpha=8, target_modules=["q_proj"]))
    save_peft_adapter(tmp_path / "adapter", model, LoRAConfig(rank=4, alpha=8, target_modules=["q_proj"]))
    config_path = tmp_path / "adapter" / ADAPTER_CONFIG_NAME
    original = json.loads(config_path.read_text())
    for init, reason in (("corda", "path_initial_model_for_weight_conversion"), ("lora_ga", "base weights"),
                         ("loftq", "quantis"), ("mica", "lora_B"), ("some_future_init", "true, false")):
        config_path.write_text(json.dumps({**original, "init_lora_weights": init}))
        with pytest.raises(CheckpointError, match=rf"init_lora_weights='{init}'.*{reason}"):
            read_peft_config(tmp_path / "adapter")
    for init in (False, "gaussian", "orthogonal", "eva"):  # plain LoRA on the unchanged base
        config_path.write_text(json.dumps({**original, "init_lora_weights": init}))
        read_peft_config(tmp_path / "adapter")


@pytest.mark.parametrize("modules_to_save", [["embed_tokens", "input_layernorm"], ["embed_tokens"], ["lm_head"],
                                             ["layernorm"], ["layers.0.input_layernorm"]])
def test_modules_to_save_that_easytrain_would_widen_are_refused(modules_to_save, llama_dir, tmp_path):
    """easytrain trains the embedding with the head and every norm: a narrower list would train more weights."""
    adapter = peft_adapter(llama_dir, tmp_path / "adapter", target_modules=["q_proj"],
                              modules_to_save=modules_to_save)
    with pytest.raises(CheckpointError, match=r"modules_to_save=.*would also train"):
        load_peft_adapter(adapter, from_pretrained(llama_dir))
