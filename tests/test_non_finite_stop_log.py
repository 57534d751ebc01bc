"""`non_finite_policy='stop'` leaves a complete metrics log: every step up to the checkpointed one is logged exactly
once, also when the non-finite step's window was logged late (after the next step was dispatched), which makes the
checkpointed step one past that window."""

import json
from pathlib import Path

import numpy as np
import pytest

from easytrain import BaseTrainer, LossOutput, NonFiniteLossError, TrainingArguments, causal_lm_loss
from easytrain.checkpoint import CheckpointManager


class NaNLoss(BaseTrainer):
    def compute_loss(self, model, batch, rng, train, frozen):
        out = causal_lm_loss(model, batch, rng, train, frozen)
        return LossOutput(out.loss_sum * np.nan, out.count, out.metrics)


def train_records(output_dir: Path) -> list[dict]:
    lines = (output_dir / "metrics.jsonl").read_text().splitlines()
    return [record for record in map(json.loads, lines) if record["split"] == "train"]


@pytest.mark.parametrize("max_steps, logging_steps", [(3, 3), (6, 2), (6, 1)])
def test_the_checkpointed_step_of_a_non_finite_stop_is_logged(tmp_path, max_steps, logging_steps):
    """Logging every 2 steps, step 2's window is fetched once step 3 is queued: the state then checkpointed is the one
    after step 3, whose metrics (fetched with the window's) are logged as a window of their own before the error."""
    output_dir = tmp_path / "run"
    args = TrainingArguments(output_dir=str(output_dir), max_length=32, train_batch_size=8, max_steps=max_steps,
                             logging_steps=logging_steps, eval_strategy="no", save_strategy="steps", save_steps=100,
                             non_finite_policy="stop", report_to=["jsonl"], disable_progress_bar=True,
                             save_pretrained_at_end=False, max_train_samples=64, max_eval_samples=16)
    with pytest.raises(NonFiniteLossError, match="at step 1 .*was checkpointed") as stopped:
        NaNLoss(args).train()
    checkpointed = CheckpointManager(output_dir / "checkpoints").latest_step()
    assert f"after step {checkpointed} was checkpointed" in str(stopped.value)
    records = train_records(output_dir)
    assert [record["step"] for record in records] == sorted({record["step"] for record in records}), "each once"
    assert records[-1]["step"] == checkpointed, "the log ends at the checkpointed step"
    assert sum(record["skipped_steps"] for record in records) == checkpointed, "every step up to it is counted once"
