"""`bco_pair`'s δ: the running mean of the rewards of every pair trained on before the step, kept in the train
state, so neither gradient accumulation nor the eval batch size changes a loss, and a resume continues exactly."""

import functools

import jax
import numpy as np
import pytest

from dpo_fixtures import stopped_copy
from easytrain import TrainingArguments
from easytrain.checkpoint import CheckpointManager
from easytrain.data import EvalBatches
from easytrain.trainers.dpo import DPOArguments, DPOTrainer
from easytrain.trainers.loop import evaluate_batches
from runs import logged

BCO = DPOArguments(loss_type=["bco_pair"])


def tiny_args(path, **overrides) -> TrainingArguments:
    values = dict(output_dir=str(path), max_length=16, train_batch_size=8, eval_batch_size=8, max_steps=4,
                  learning_rate=1e-2, logging_steps=1, eval_strategy="no", save_strategy="no", report_to=["jsonl"],
                  disable_progress_bar=True, save_pretrained_at_end=False, max_train_samples=32, max_eval_samples=16)
    values.update(overrides)
    return TrainingArguments(**values)


def delta(trainer: DPOTrainer) -> float:
    return float(trainer.state.frozen["bco_delta"]["mean"])


def eval_loss(trainer: DPOTrainer, batch_size: int) -> float:
    batches = EvalBatches(trainer.dataset_eval, batch_size, collate=trainer.collate)
    return evaluate_batches(functools.partial(trainer.functions.eval_step, trainer.state),
                            map(trainer.to_global, batches))["eval_loss"]


def test_delta_is_the_running_mean_of_past_rewards_whatever_the_accumulation_or_eval_batch(tmp_path):
    whole = DPOTrainer(tiny_args(tmp_path / "whole"), BCO)
    whole.train()
    micro = DPOTrainer(tiny_args(tmp_path / "micro", gradient_accumulation_steps=4), BCO)
    micro.train()
    losses, micro_losses = logged(tmp_path / "whole"), logged(tmp_path / "micro")
    assert len(losses) == 4 and losses[1] != losses[4], "the steps must move the policy"
    np.testing.assert_allclose(list(micro_losses.values()), list(losses.values()), rtol=0, atol=1e-6)
    chosen, rejected = logged(tmp_path / "whole", "rewards/chosen"), logged(tmp_path / "whole", "rewards/rejected")
    rewards = [(chosen[step] + rejected[step]) / 2 for step in sorted(chosen)]  # 8 pairs in every step
    assert abs(np.mean(rewards)) > 1e-4, "the rewards must move away from 0 for delta to matter"
    assert delta(whole) == pytest.approx(np.mean(rewards), rel=1e-5, abs=1e-7)
    assert float(whole.state.frozen["bco_delta"]["count"]) == 32
    assert delta(micro) == pytest.approx(delta(whole), rel=1e-5, abs=1e-7)
    at_eight = whole.evaluate()["eval_loss"]
    assert eval_loss(whole, 2) == pytest.approx(at_eight, rel=0, abs=1e-6)
    assert delta(whole) == pytest.approx(np.mean(rewards), rel=1e-5, abs=1e-7), "evaluation leaves delta alone"


def test_delta_is_checkpointed_and_a_resume_continues_exactly(tmp_path):
    common = dict(max_steps=5, save_strategy="steps", save_steps=3)
    straight = DPOTrainer(tiny_args(tmp_path / "straight", **common), BCO)
    straight.train()
    stopped_copy(tmp_path / "straight", tmp_path / "cut", step=3)
    keys = CheckpointManager(tmp_path / "cut" / "checkpoints").stored_signature(3)
    assert any(key.startswith("frozen.bco_delta.") for key in keys)
    resumed = DPOTrainer(tiny_args(tmp_path / "cut", resume_from_checkpoint="latest", **common), BCO)
    resumed.train()
    assert logged(tmp_path / "cut") == logged(tmp_path / "straight")
    for ours, theirs in zip(jax.tree.leaves(resumed.state.frozen["bco_delta"]),
                            jax.tree.leaves(straight.state.frozen["bco_delta"])):
        np.testing.assert_array_equal(np.asarray(ours), np.asarray(theirs))


def test_delta_exists_only_for_bco_pair(tmp_path):
    assert "bco_delta" not in DPOTrainer(tiny_args(tmp_path / "sigmoid")).state.frozen
    weighted = DPOTrainer(tiny_args(tmp_path / "weighted"), DPOArguments(loss_type=["sigmoid", "bco_pair"],
                                                                         loss_weights=[1.0, 0.5],
                                                                         precompute_ref_log_probs=True))
    assert set(weighted.state.frozen) == {"bco_delta"}, "precomputed reference: delta alone, no reference model"
