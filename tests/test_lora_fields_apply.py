"""`lora_*` settings given while `lora_rank` is 0 (and no `lora_adapter_path`) would silently run full fine-tuning:
they are refused when the arguments are built, naming every field given and the fix (set lora_rank)."""

from __future__ import annotations

import pytest

from easytrain import ArgumentError, TrainingArguments

GIVEN = {"lora_alpha": 32.0, "lora_dropout": 0.05, "lora_target_modules": ["q_proj", "v_proj"],
         "lora_train_embeddings": True, "lora_train_norms": True, "lora_use_rslora": True, "lora_export": "adapter"}


@pytest.mark.parametrize("field", GIVEN)
def test_a_lora_field_without_lora_rank_is_refused_by_name(tmp_path, field):
    with pytest.raises(ArgumentError) as error:
        TrainingArguments(output_dir=str(tmp_path), **{field: GIVEN[field]})
    assert error.value.field == field
    assert f"{field}={GIVEN[field]!r}" in error.value.message and "set lora_rank" in error.value.message


def test_every_field_given_is_named(tmp_path):
    with pytest.raises(ArgumentError) as error:
        TrainingArguments(output_dir=str(tmp_path), lora_alpha=32.0, lora_dropout=0.05, lora_export="adapter")
    assert error.value.field == "lora_alpha"
    assert all(name in error.value.message for name in ("lora_alpha", "lora_dropout", "lora_export"))
    assert "lora_target_modules" not in error.value.message  # left at its default


def test_the_same_fields_apply_with_lora_rank_or_an_adapter(tmp_path):
    TrainingArguments(output_dir=str(tmp_path), lora_rank=8, **GIVEN)
    TrainingArguments(output_dir=str(tmp_path), lora_adapter_path=str(tmp_path / "adapter"), lora_export="adapter")
    TrainingArguments(output_dir=str(tmp_path))  # every lora_* field at its default: full fine-tuning, as asked
