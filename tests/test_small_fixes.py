"""Resume compares LoRA targets however they were spelled; `disable_progress_bar` quiets the preparation of a set
given to `evaluate()`."""

import sys

import datasets
import pytest

from easytrain import ArgumentError, BaseTrainer, TrainingArguments
from easytrain.trainers.resume import check_resumable


def run_info_with(**arguments) -> dict:
    defaults = dict(seed=0, train_batch_size=4, tokenizer_name=None, model_name_or_path=None)
    return {"format_version": 1, "arguments": defaults | arguments, "model_config": None}


@pytest.mark.parametrize("stored, now", [(["q_proj,v_proj"], ["q_proj", "v_proj"]),
                                         (["v_proj", "q_proj"], ["q_proj, v_proj"]),
                                         (["all-linear"], ["all-linear"])])
def test_lora_targets_joined_by_commas_are_the_same_targets(stored, now):
    assert check_resumable(run_info_with(lora_rank=4, lora_target_modules=stored),
                           run_info_with(lora_rank=4, lora_target_modules=now)) == []


def test_other_lora_targets_are_still_refused():
    stored = run_info_with(lora_rank=4, lora_target_modules=["q_proj,v_proj"])
    with pytest.raises(ArgumentError, match="lora_target_modules"):
        check_resumable(stored, run_info_with(lora_rank=4, lora_target_modules=["q_proj", "k_proj"]))
    with pytest.raises(ArgumentError, match="lora_target_modules"):
        check_resumable(stored, run_info_with(lora_rank=4, lora_target_modules=["all-linear"]))


@pytest.mark.parametrize("disable", [True, False])
def test_disable_progress_bar_quiets_preparing_a_set_given_to_evaluate(tmp_path, capfd, monkeypatch, disable):
    monkeypatch.setattr(sys.modules["datasets.utils.tqdm"], "_hf_datasets_progress_bars_disabled", False)
    trainer = BaseTrainer(TrainingArguments(output_dir=str(tmp_path / "run"), max_length=16, train_batch_size=8,
                                            eval_batch_size=8, max_steps=1, eval_strategy="no", save_strategy="no",
                                            report_to=[], disable_progress_bar=disable, max_train_samples=16))
    trainer.setup()
    capfd.readouterr()
    metrics = trainer.evaluate(datasets.Dataset.from_dict({"text": [f"{i}+{i}={2 * i:03d}" for i in range(40)]}))
    assert "eval_loss" in metrics
    assert ("Tokenizing" in capfd.readouterr().err) is not disable
    assert datasets.utils.are_progress_bars_disabled() is False, "the switch is thrown back after evaluate"
