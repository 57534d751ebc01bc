"""bfloat16 compute with float32 master weights trains like float32."""

import jax
import jax.numpy as jnp
import pytest

from easytrain import BaseTrainer, TrainingArguments


def train(tmp_path, dtype: str) -> BaseTrainer:
    args = TrainingArguments(output_dir=str(tmp_path / dtype), dtype=dtype, param_dtype="float32", max_steps=40,
                             max_length=32, train_batch_size=16, logging_steps=40, eval_strategy="no",
                             save_strategy="no", report_to=["none"], disable_progress_bar=True,
                             save_pretrained_at_end=False, max_eval_samples=16, warmup_steps=5)
    trainer = BaseTrainer(args)
    trainer.last_logs = trainer.train()
    return trainer


def test_bfloat16_compute_tracks_float32(tmp_path):
    full, mixed = train(tmp_path, "float32"), train(tmp_path, "bfloat16")
    assert {leaf.dtype for leaf in jax.tree.leaves(mixed.state.params)} == {jnp.dtype("float32")}
    assert {leaf.dtype for leaf in jax.tree.leaves(mixed.state.opt_state) if leaf.ndim} == {jnp.dtype("float32")}
    assert mixed.model.layers[0].self_attn.q_proj.dtype == jnp.bfloat16
    start = 2.9  # about ln(18), the loss of a uniform guess over the arithmetic vocabulary
    assert full.last_logs["loss"] < start - 0.5  # it learned something, so the comparison means something
    assert mixed.last_logs["loss"] == pytest.approx(full.last_logs["loss"], abs=0.05)
    assert mixed.evaluate()["eval_loss"] == pytest.approx(full.evaluate()["eval_loss"], abs=0.05)
