"""What an export says beside its weights: the source checkpoint's generation_config.json carried through
unchanged (plain save, trainer export, LoRA merged export), `architectures` for configs that lack it, and the
tokenizer's special ids in a model built from a config file."""

import json
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import transformers
from flax import nnx
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

from easytrain import BaseTrainer, TrainingArguments
from easytrain.models import from_pretrained, init_model, save_pretrained
from easytrain.models.presets import llama_config
from easytrain.tasks import build_arithmetic_tokenizer

from model_configs import family_config

# Like Qwen2.5-Instruct / Llama-3.1-Instruct: a second EOS and sampling defaults found only in this file.
INSTRUCT = dict(bos_token_id=1, eos_token_id=[2, 0], do_sample=True, temperature=0.7, top_p=0.8)


def generation_file(directory: Path) -> dict:
    values = json.loads((directory / "generation_config.json").read_text())
    values.pop("transformers_version", None)
    return values


def base_checkpoint(directory: Path, model_type: str = "qwen2", generation: dict | None = INSTRUCT) -> Path:
    """A tiny checkpoint whose config.json has no EOS (as Qwen2's), with an instruct generation config."""
    config = family_config(model_type, bos_token_id=None, eos_token_id=None, pad_token_id=None)
    save_pretrained(directory, nnx.to_pure_dict(nnx.state(init_model(config), nnx.Param)), config)
    build_arithmetic_tokenizer().save_pretrained(directory)  # the trainers below read the folder's tokenizer
    (directory / "generation_config.json").unlink()
    if generation is not None:
        transformers.GenerationConfig(**generation).save_pretrained(directory)
    return directory


@pytest.mark.parametrize("model_type", ["llama", "qwen2"])
def test_load_then_save_carries_the_source_generation_config_unchanged(tmp_path, model_type):
    source = base_checkpoint(tmp_path / "source", model_type)
    model = from_pretrained(source)
    save_pretrained(tmp_path / "export", model, model.config)
    assert generation_file(tmp_path / "export") == generation_file(source)
    exported = transformers.GenerationConfig.from_pretrained(tmp_path / "export")
    assert exported.eos_token_id == [2, 0] and exported.do_sample and exported.top_p == 0.8


def test_a_source_without_generation_config_exports_one_derived_from_its_config(tmp_path):
    source = base_checkpoint(tmp_path / "source", "llama", generation=None)
    model = from_pretrained(source)
    config = model.config
    config.eos_token_id = 5
    save_pretrained(tmp_path / "export", model, config)
    assert transformers.GenerationConfig.from_pretrained(tmp_path / "export").eos_token_id == 5


def trainer_arguments(output_dir: Path, base: Path, **overrides) -> TrainingArguments:
    return TrainingArguments(**{**dict(
        output_dir=str(output_dir), model_name_or_path=str(base), max_length=32, train_batch_size=8, max_steps=1,
        eval_strategy="no", save_strategy="no", report_to=["none"], disable_progress_bar=True,
        save_pretrained_at_end=False, max_train_samples=16, max_eval_samples=8), **overrides})


@pytest.mark.parametrize("lora", [{}, dict(lora_rank=4, lora_export="both")], ids=["full", "lora-merged"])
def test_trainer_export_carries_the_base_generation_config(tmp_path, lora):
    """A run from a checkpoint exported `eos_token_id` None (Qwen2: no EOS in config.json) and no sampling
    defaults: transformers' generate on the export no longer stopped, and decoded greedily."""
    base = base_checkpoint(tmp_path / "base")
    export = BaseTrainer(trainer_arguments(tmp_path / "run", base, **lora)).save_pretrained(tmp_path / "export")
    assert generation_file(export) == generation_file(base)


def test_a_resumed_run_exports_the_base_generation_config(tmp_path):
    """The module of a resumed run is restored from the checkpoint, never loaded from the base."""
    base = base_checkpoint(tmp_path / "base")
    saving = dict(save_strategy="steps", save_steps=1)
    BaseTrainer(trainer_arguments(tmp_path / "run", base, **saving)).train()
    resumed = BaseTrainer(trainer_arguments(tmp_path / "run", base, max_steps=2, resume_from_checkpoint="latest",
                                            **saving))
    assert generation_file(resumed.save_pretrained(tmp_path / "export")) == generation_file(base)


@pytest.mark.parametrize("model_type", ["llama", "mistral", "qwen2", "qwen3"])
def test_a_config_without_architectures_exports_the_family_causal_lm_class(tmp_path, model_type):
    config = family_config(model_type)
    assert not config.architectures
    save_pretrained(tmp_path, nnx.to_pure_dict(nnx.state(init_model(config), nnx.Param)), config)
    architectures = json.loads((tmp_path / "config.json").read_text()).get("architectures")
    assert architectures == [MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[model_type]]
    assert not config.architectures  # the caller's config is left as it was


def test_architectures_the_config_names_are_kept(tmp_path):
    config = family_config("llama", architectures=["MyLlamaForCausalLM"])
    save_pretrained(tmp_path, nnx.to_pure_dict(nnx.state(init_model(config), nnx.Param)), config)
    assert json.loads((tmp_path / "config.json").read_text())["architectures"] == ["MyLlamaForCausalLM"]


def test_model_config_file_takes_the_tokenizer_special_ids_it_leaves_unset(tmp_path):
    """A preset got the tokenizer's bos/eos/pad ids, a config.json none: a model trained from it exported no EOS."""
    fields = dict(model_type="qwen3", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=16)
    (tmp_path / "plain.json").write_text(json.dumps(fields))
    (tmp_path / "own.json").write_text(json.dumps(fields | dict(eos_token_id=7, pad_token_id=None)))
    specials = dict(bos_token_id=1, eos_token_id=2, pad_token_id=0)
    for name in ("tiny", str(tmp_path / "plain.json")):
        config = llama_config(name, vocab_size=300, **specials)
        assert (config.bos_token_id, config.eos_token_id, config.pad_token_id) == (1, 2, 0), name
    own = llama_config(str(tmp_path / "own.json"), vocab_size=300, **specials)
    assert (own.bos_token_id, own.eos_token_id, own.pad_token_id) == (1, 7, 0)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_config_records_the_storage_dtype_not_the_source_one(tmp_path, dtype):
    """transformers' dtype="auto" and vLLM read config.json's dtype: a float32 model stored in bfloat16 must say so."""
    config = family_config("llama", dtype="float32")
    save_pretrained(tmp_path, nnx.to_pure_dict(nnx.state(init_model(config), nnx.Param)), config, dtype=dtype)
    assert json.loads((tmp_path / "config.json").read_text())["dtype"] == dtype
    assert config.to_dict()["dtype"] == "float32"  # the caller's config is left as it was
