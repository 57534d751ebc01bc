"""What DPO's arguments alone refuse is refused before anything is written: no output_dir is made for a trainer
that never runs (the check runs first in the start every process agrees on, `BaseTrainer.check_inputs`)."""

import pytest

from easytrain import TrainingArguments
from easytrain.errors import ArgumentError
from easytrain.trainers.dpo import DPOTrainer
from easytrain.trainers.dpo_arguments import DPOArguments

REFUSED = [
    (dict(text_column="body"), {}, "text_column", "is not read by DPO"),
    (dict(lora_rank=2), dict(sync_ref_model=True), "sync_ref_model", "TR-DPO mixes the trained weights"),
    (dict(lora_rank=2, lora_train_embeddings=True), {}, "lora_train_embeddings", "adapter-off reference would move"),
    (dict(lora_rank=2, lora_train_norms=True), {}, "lora_train_norms", "adapter-off reference would move"),
]


@pytest.mark.parametrize(("arguments", "dpo", "field", "message"), REFUSED, ids=[r[2] for r in REFUSED])
def test_a_refused_dpo_trainer_leaves_no_output_dir(tmp_path, arguments, dpo, field, message):
    output_dir = tmp_path / "runs" / "run"
    with pytest.raises(ArgumentError, match=message) as error:
        DPOTrainer(TrainingArguments(output_dir=str(output_dir), **arguments), DPOArguments(**dpo))
    assert error.value.field == field
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("dpo", [dict(precompute_ref_log_probs=True), dict(loss_type=["simpo"])],
                         ids=["precomputed reference", "no reference"])
def test_lora_trained_embeddings_with_a_fixed_or_no_reference_are_accepted(tmp_path, dpo):
    """The refusal is for the adapter-off reference alone: a precomputed reference, or none, is fixed."""
    trainer = DPOTrainer(TrainingArguments(output_dir=str(tmp_path / "run"), lora_rank=2, lora_train_embeddings=True),
                         DPOArguments(**dpo))
    assert trainer.lora is not None and not trainer.reference_is_base
