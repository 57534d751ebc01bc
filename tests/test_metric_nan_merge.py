"""A logging window or an evaluation merges fetched metrics on the host: the result is the device merge's, NaN
included (a NaN in one step of a window shows in its log whatever `logging_steps` is)."""

import jax.numpy as jnp
import numpy as np
import pytest

from easytrain import BaseTrainer
from easytrain.metrics import ExpMean, Last, Max, Mean, Min, Sum, fetch, reduce_window
from tests.runs import args_for, logged

NAN = float("nan")
FINITE = [0.25, 1.5, -2.0]


def one_of_each(value: float) -> dict:
    value = jnp.float32(value)
    return {"mean": Mean(value, jnp.float32(2)), "exp_mean": ExpMean(value, jnp.float32(2)), "sum": Sum(value),
            "max": Max(value), "min": Min(value), "last": Last(value)}


def merged_on_device(window: list[dict]) -> dict[str, float]:
    merged = window[0]
    for metrics in window[1:]:
        merged = {key: value.merge(metrics[key]) for key, value in merged.items()}
    return {key: value.result() for key, value in merged.items()}


@pytest.mark.parametrize("nan_at", [0, 1, 2, 3, None])
def test_the_host_merge_of_fetched_metrics_is_the_device_merge(nan_at):
    order = FINITE if nan_at is None else [*FINITE[:nan_at], NAN, *FINITE[nan_at:]]
    window = [one_of_each(value) for value in order]
    on_host, on_device = reduce_window(fetch(window)), merged_on_device(window)
    assert set(on_host) == set(on_device)
    for key, value in on_device.items():
        np.testing.assert_equal(on_host[key], value, err_msg=key)


@pytest.mark.parametrize("kind", [Max, Min])
def test_a_nan_wins_a_host_merge_of_python_and_numpy_numbers(kind):
    assert np.isnan(reduce_window([{"m": kind(1.0)}, {"m": kind(NAN)}])["m"])
    assert np.isnan(reduce_window([{"m": kind(NAN)}, {"m": kind(np.float32(1.0))}])["m"])
    assert np.isnan(reduce_window(fetch([{"m": kind(jnp.float32(1.0))}, {"m": kind(jnp.float32(NAN))}]))["m"])


class ProbeEachStep(BaseTrainer):
    """Adds Max and Min of a value that is NaN at the second step only (1, NaN, 3, 4)."""

    calls = 0

    def train_iteration(self, state, batch):
        state, metrics = super().train_iteration(state, batch)
        self.calls += 1
        value = jnp.float32(NAN if self.calls == 2 else self.calls)
        return state, {**metrics, "probe_max": Max(value), "probe_min": Min(value)}


def test_a_nan_at_one_step_shows_in_a_window_of_several_steps(tmp_path):
    ProbeEachStep(args_for(tmp_path / "run", save_strategy="no", logging_steps=2)).train()
    assert logged(tmp_path / "run", "probe_max") == {2: "nan", 4: 4.0}  # metrics.jsonl writes NaN as "nan"
    assert logged(tmp_path / "run", "probe_min") == {2: "nan", 4: 3.0}
