"""DPO's loss runs the policy without dropout by default (TRL's `disable_dropout`), so the train loss of a step
equals the eval loss of the weights it starts from; and the `rewards/*`, `logps/*` metrics of length-normalised
losses are of per-token mean log-probs, as TRL reports them."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest

from easytrain import TrainingArguments
from easytrain.tasks.arithmetic import make_arithmetic_preference_splits
from easytrain.trainers.dpo import DPOArguments, DPOTrainer
from runs import logged
from test_lora_trainer import write_base


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return write_base(tmp_path_factory.mktemp("base"))


@pytest.fixture(scope="module")
def pairs():
    return make_arithmetic_preference_splits(num_train=8, num_validation=8, seed=3)["train"]


def run(output_dir, base, pairs, dpo: DPOArguments, **overrides) -> DPOTrainer:
    """Steps of the whole 8-pair set, evaluated on the same 8 pairs after each step."""
    values = dict(output_dir=str(output_dir), model_name_or_path=str(base), max_length=16, train_batch_size=8,
                  eval_batch_size=8, max_steps=3, learning_rate=5e-2, warmup_steps=0, logging_steps=1,
                  eval_strategy="steps", eval_steps=1, save_strategy="no", report_to=["jsonl"],
                  disable_progress_bar=True, save_pretrained_at_end=False)
    trainer = DPOTrainer(TrainingArguments(**{**values, **overrides}), dpo, dataset_train=pairs, dataset_eval=pairs)
    trainer.train()
    return trainer


def test_lora_dropout_is_off_in_the_loss_by_default(tmp_path, base, pairs, caplog):
    with caplog.at_level(logging.WARNING, logger="easytrain"):
        run(tmp_path / "off", base, pairs, DPOArguments(beta=0.5), lora_rank=4, lora_dropout=0.5)
    run(tmp_path / "on", base, pairs, DPOArguments(beta=0.5, disable_dropout=False), lora_rank=4, lora_dropout=0.5)
    for name, close in (("off", True), ("on", False)):
        train, evaluated = logged(tmp_path / name), logged(tmp_path / name, "eval_loss", split="eval")
        after = [evaluated[step] for step in (1, 2)]  # the weights step 2 and 3 start from
        assert np.allclose([train[2], train[3]], after, rtol=1e-4, atol=1e-6) is close, (name, train, evaluated)
    warned = [r.getMessage() for r in caplog.records if "disable_dropout" in r.getMessage()]
    assert len(warned) == 1 and "lora_dropout" in warned[0]


def test_per_token_metrics_for_length_normalised_losses(tmp_path, base, pairs):
    """Arithmetic pairs have completions of one length L: the per-token means are the sums divided by L."""
    summed = run(tmp_path / "sigmoid", base, pairs, DPOArguments(), max_steps=1, eval_strategy="no")
    per_token = run(tmp_path / "ipo", base, pairs, DPOArguments(loss_type=["ipo"]), max_steps=1, eval_strategy="no")
    del summed, per_token
    ratios = [logged(tmp_path / "sigmoid", key)[1] / logged(tmp_path / "ipo", key)[1]
              for key in ("logps/chosen", "logps/rejected")]
    assert ratios[0] == pytest.approx(ratios[1], rel=1e-5) and ratios[0] > 1.5
    assert ratios[0] == pytest.approx(round(ratios[0]), rel=1e-5)


def test_a_checkpoint_from_before_disable_dropout_resumes_warning_that_dropout_is_now_off(tmp_path, base, pairs,
                                                                                         caplog):
    """Checkpoints record disable_dropout; one written before it was (its run kept lora_dropout on in the loss)
    resumes, and the switch to no dropout from the restored step on is warned about, with the flag that keeps it."""
    first = run(tmp_path, base, pairs, DPOArguments(beta=0.5), max_steps=1, eval_strategy="no",
                save_strategy="steps", save_steps=1, lora_rank=4, lora_dropout=0.5)
    assert first.run_info()["task_arguments"]["disable_dropout"] is True
    stored = tmp_path / "checkpoints" / "1" / "run_info" / "metadata"
    run_info = json.loads(stored.read_text())
    del run_info["task_arguments"]["disable_dropout"]
    stored.write_text(json.dumps(run_info))
    with caplog.at_level(logging.WARNING, logger="easytrain"):
        run(tmp_path, base, pairs, DPOArguments(beta=0.5), max_steps=2, eval_strategy="no", save_strategy="steps",
            save_steps=1, lora_rank=4, lora_dropout=0.5, resume_from_checkpoint="latest")
    warned = [r.getMessage() for r in caplog.records if "trained with" in r.getMessage()]
    assert len(warned) == 1 and "--no_disable_dropout" in warned[0], caplog.text
