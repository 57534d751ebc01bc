"""DPO's evaluation metrics where their values are known without training: at the start the policy is its
reference, so every reward is 0 (no pair is won, margins 0); and a set's metrics are its own rows', whatever the
padding rows its eval batch holds. An added `sft` loss (the chosen answer's NLL) makes each pair's loss its own
from the start, where the DPO loss alone is ln 2 for real and padding rows alike."""

import math

from easytrain.trainers.dpo import DPOArguments, DPOTrainer
from test_eval_batch_shapes import arguments, assert_same_metrics, in_batches_of, pairs


def test_rewards_are_zero_at_the_reference_and_eval_padding_rows_weigh_nothing(tmp_path):
    trainer = DPOTrainer(arguments(tmp_path, max_train_samples=8, max_eval_samples=8),
                         DPOArguments(loss_type=["sigmoid", "sft"]))
    start = trainer.evaluate()
    assert start["eval_rewards/chosen"] == start["eval_rewards/rejected"] == 0.0, start
    assert start["eval_rewards/accuracies"] == 0.0, "a tie (both rewards 0) wins no pair"
    assert start["eval_rewards/margins"] == 0.0, "the margin of the rewards, relative to the reference"
    rows = pairs(3, 30)
    padded = trainer.evaluate(rows)  # 3 pairs and 5 padding rows in one batch of 8
    assert padded["eval_loss"] > math.log(2) + 1, padded  # the sft term: a padding row would move the mean
    assert_same_metrics(padded, in_batches_of(trainer, trainer.prepare_eval_dataset(rows), 3), "3 pairs")
