"""PEFT LoRA variants easytrain cannot compute are refused by their field, with the way out, before any weight is
read; every field of the installed PEFT's LoraConfig is classified, and fields of a newer PEFT are judged by value."""

import dataclasses
import json
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest

from easytrain.models import CheckpointError, from_pretrained
from easytrain.models.peft_config import ACCEPTED_FIELDS, _UNSUPPORTED, read_peft_config
from easytrain.models.peft_io import ADAPTER_CONFIG_NAME, load_peft_adapter

from lora_models import LLAMA, write_base

peft = pytest.importorskip("peft")


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory) -> Path:
    return write_base(tmp_path_factory.mktemp("llama"), LLAMA)


def peft_adapter(base_dir: Path, directory: Path, **fields) -> Path:
    import torch
    import transformers

    torch.manual_seed(0)
    base = transformers.AutoModelForCausalLM.from_pretrained(base_dir)
    peft.get_peft_model(base, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"], **fields)) \
        .save_pretrained(directory)
    return directory


@pytest.mark.parametrize("field", ["kasa_config", "monteclora_config", "velora_config"])
def test_lora_variants_are_refused_by_field_not_as_a_weight_mismatch(field, llama_dir, tmp_path):
    adapter = peft_adapter(llama_dir, tmp_path / "adapter", **{field: {}})
    with pytest.raises(CheckpointError, match=rf"{field}=.*merge_and_unload") as error:
        load_peft_adapter(adapter, from_pretrained(llama_dir))
    assert "does not match the modules" not in str(error.value)


def test_every_field_of_the_installed_lora_config_is_classified():
    fields = {field.name for field in dataclasses.fields(peft.LoraConfig)}
    unclassified = fields - set(ACCEPTED_FIELDS) - set(_UNSUPPORTED)
    assert not unclassified, f"review these LoraConfig fields: accept them or refuse them ({sorted(unclassified)})"


def written_config(llama_dir: Path, tmp_path: Path, **extra) -> Path:
    adapter = peft_adapter(llama_dir, tmp_path / "adapter")
    path = adapter / ADAPTER_CONFIG_NAME
    path.write_text(json.dumps({**json.loads(path.read_text()), **extra}))
    return adapter


@pytest.mark.parametrize("value", [{"groups": 2}, True, "on", 3, ["q_proj"]])
def test_an_unknown_field_that_is_set_is_refused_by_name(value, llama_dir, tmp_path):
    adapter = written_config(llama_dir, tmp_path, future_variant_config=value)
    with pytest.raises(CheckpointError, match=r"future_variant_config=.*does not know.*merge_and_unload"):
        read_peft_config(adapter)


@pytest.mark.parametrize("value", [None, False, {}, [], "", 0])
def test_an_unknown_field_left_off_loads(value, llama_dir, tmp_path):
    adapter = written_config(llama_dir, tmp_path, future_variant_config=value)
    assert read_peft_config(adapter)[0].rank == 4


def test_inert_fields_of_a_plain_adapter_are_accepted(llama_dir, tmp_path):
    adapter = written_config(llama_dir, tmp_path, megatron_core="megatron.core", qalora_group_size=32,
                             layers_pattern="layers", eva_config={"rho": 2.0}, loftq_config={"loftq_bits": 4})
    assert read_peft_config(adapter)[0].rank == 4
