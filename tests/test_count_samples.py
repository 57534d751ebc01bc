"""`count_samples(batch)`: the rows a step trains on, for `samples_per_second`. By default this process's host
batch rows (the global batch, with gradient accumulation too); a trainer whose step trains on more rows than its
batch (G sampled completions per prompt) counts those."""

from __future__ import annotations

import numpy as np
import pytest

from easytrain import BaseTrainer, TrainingArguments
from easytrain.throughput import BatchCounts, window_logs
from runs import logged


class TwoPerRow(BaseTrainer):
    """As a trainer whose step trains on two completions per row of its batch would count."""

    def count_samples(self, batch):
        return 2 * super().count_samples(batch)


def samples_per_step(output_dir) -> set[float]:
    """samples_per_second * step_time of every logged window: the samples of one step."""
    rates, times = logged(output_dir, "samples_per_second"), logged(output_dir, "step_time")
    assert sorted(rates) == [2, 4]
    return {round(rates[step] * times[step], 6) for step in rates}


def tiny_args(output_dir, **overrides) -> TrainingArguments:
    values = dict(output_dir=str(output_dir), max_length=16, train_batch_size=8, max_steps=4, logging_steps=2,
                  eval_strategy="no", save_strategy="no", report_to=["jsonl"], disable_progress_bar=True,
                  save_pretrained_at_end=False, max_train_samples=64)
    return TrainingArguments(**(values | overrides))


@pytest.mark.parametrize("accumulation", [1, 2])
def test_the_default_counts_the_global_batch(tmp_path, accumulation):
    BaseTrainer(tiny_args(tmp_path, gradient_accumulation_steps=accumulation)).train()
    assert samples_per_step(tmp_path) == {8.0}


def test_a_trainer_counting_two_samples_a_row_logs_twice_the_rate(tmp_path):
    trainer = TwoPerRow(tiny_args(tmp_path))
    trainer.train()
    assert samples_per_step(tmp_path) == {16.0}


def test_window_counts_are_scaled_by_the_process_count():
    """Each process counts its own host batch (an equal share of the global one), as for tokens."""
    logs = window_logs([BatchCounts(samples=3)] * 2, seconds=2.0, rows_per_step=4, process_count=2,
                       peak=lambda: None)
    assert logs["samples_per_second"] == pytest.approx(2 * 3 * 2 / 2.0)


def test_rows_are_counted_from_any_array_field():
    """A collate may return jax arrays (check_collated takes any field with a shape and dtype): their rows count;
    a batch with no array field counts none, and the window then takes the global batch size."""
    import jax.numpy as jnp

    from easytrain import throughput

    assert throughput.batch_rows({"x": jnp.zeros((6, 3)), "ids": ["a"] * 6}) == 6
    assert throughput.batch_rows({"note": "host only"}) is None
    logs = throughput.window_logs([throughput.BatchCounts(samples=None)], seconds=1.0, process_count=2,
                                  rows_per_step=8, peak=lambda: None)
    assert logs["samples_per_second"] == 8


def test_a_scalar_field_has_no_rows():
    from easytrain import throughput

    assert throughput.batch_rows({"temperature": np.float32(0.7), "x": np.zeros((3, 2))}) == 3
