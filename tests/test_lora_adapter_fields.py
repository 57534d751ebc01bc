"""`lora_adapter_path` decides the adapter's fields: a `lora_*` argument set (off its default) to another value than
the adapter's config is refused, naming the field, both values and the fix; one set to the adapter's value, or left
at its default, is accepted."""

from __future__ import annotations

import json

import pytest

from easytrain import ArgumentError, TrainingArguments
from easytrain.trainers import adapters

ADAPTER = {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "lora_dropout": 0.1, "target_modules": ["q_proj", "v_proj"],
           "use_rslora": False, "modules_to_save": None}


@pytest.fixture
def adapter(tmp_path):
    directory = tmp_path / "adapter"
    directory.mkdir()
    (directory / "adapter_config.json").write_text(json.dumps(ADAPTER))
    return str(directory)


def arguments(tmp_path, adapter, **lora) -> TrainingArguments:
    return TrainingArguments(output_dir=str(tmp_path / "run"), lora_adapter_path=adapter, **lora)


@pytest.mark.parametrize("field, value, shown", [
    ("lora_rank", 8, "4"), ("lora_alpha", 32.0, "8.0"), ("lora_dropout", 0.3, "0.1"),
    ("lora_target_modules", ["q_proj"], "v_proj"), ("lora_train_norms", True, "False"),
    ("lora_train_embeddings", True, "False"), ("lora_use_rslora", True, "False")])
def test_an_explicit_lora_field_other_than_the_adapters_is_refused(tmp_path, adapter, field, value, shown):
    with pytest.raises(ArgumentError) as error:
        adapters.run_config(arguments(tmp_path, adapter, **{field: value}))
    assert error.value.field == field
    assert str(value) in error.value.message and shown in error.value.message
    assert f"drop --{field}" in error.value.message


def test_fields_left_at_their_defaults_or_equal_to_the_adapters_are_accepted(tmp_path, adapter):
    config = adapters.run_config(arguments(tmp_path, adapter))
    assert (config.rank, config.alpha, config.dropout, set(config.target_modules)) == (4, 8.0, 0.1,
                                                                                      {"q_proj", "v_proj"})
    same = adapters.run_config(arguments(tmp_path, adapter, lora_rank=4, lora_alpha=8, lora_dropout=0.1,
                                         lora_target_modules=["v_proj", "q_proj"]))
    assert same == config
