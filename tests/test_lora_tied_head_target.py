"""`lm_head` named in `target_modules` on a base whose head is tied to its input embeddings: the base has no head
layer of its own to adapt (PEFT adapts the tied head, which easytrain cannot hold apart from the embedding). The
refusal names that cause, for a config written here and for a PEFT adapter, instead of "matches no dense layer" or
"check that the adapter was trained on this base model"."""

from __future__ import annotations

import pytest

from easytrain import lora
from easytrain.models.hf_io import CheckpointError
from easytrain.lora import LoRAConfig, LoRAConfigError
from easytrain.models import from_pretrained
from easytrain.models.peft_io import load_peft_adapter
from lora_models import QWEN3_TIED, write_base
from peft_fixtures import moved_peft_model


@pytest.fixture(scope="module")
def tied_base(tmp_path_factory):
    return write_base(tmp_path_factory.mktemp("qwen3_tied"), QWEN3_TIED)


@pytest.mark.parametrize("strict", [True, False], ids=["a config written here", "as PEFT's are read"])
def test_a_tied_head_target_is_refused_naming_the_tie(tied_base, strict):
    config = LoRAConfig(rank=2, target_modules=["q_proj", "lm_head"], strict_targets=strict)
    with pytest.raises(LoRAConfigError, match="tied to the input embeddings") as error:
        lora.apply_lora(from_pretrained(tied_base), config)
    assert error.value.field == "target_modules" and "tie_word_embeddings" in error.value.message


def test_a_peft_adapter_on_a_tied_head_is_refused_naming_the_tie(tied_base, tmp_path):
    """Measured before: refused with "Check that the adapter was trained on this base model" (it was)."""
    moved_peft_model(tied_base, lora_alpha=8, scale=0.1, target_modules=["q_proj", "lm_head"]).save_pretrained(
        tmp_path / "adapter")
    with pytest.raises(CheckpointError, match="tied to the input embeddings"):
        load_peft_adapter(tmp_path / "adapter", from_pretrained(tied_base))
