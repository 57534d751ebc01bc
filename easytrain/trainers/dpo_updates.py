"""What DPO adds to the compiled update: `bco_pair`'s running mean of the rewards (its δ), kept in `state.frozen`."""

from __future__ import annotations

from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp

from easytrain.preference import running_mean

#: `state.frozen` entry of `bco_pair`'s δ: the running mean of the rewards of the pairs trained on so far.
REWARD_MEAN = "bco_delta"


def update_then_track_rewards(state: Any, batch: Mapping[str, jax.Array], *,
                              update: Callable[..., Any]) -> tuple[Any, dict]:
    """One update, then `bco_pair`'s δ (`REWARD_MEAN`) takes in the rewards of the whole global batch, read from the
    merged metrics: the same whatever the micro-batch split. A skipped (non-finite) step trained on nothing."""
    state, metrics = update(state, batch)
    chosen, rejected, old = metrics["rewards/chosen"], metrics["rewards/rejected"], state.frozen[REWARD_MEAN]
    mean, count = running_mean(old["mean"], old["count"], (chosen.total + rejected.total) / 2, chosen.count)
    kept = metrics["skipped_steps"].total == 0
    new = {"mean": jnp.where(kept, mean, old["mean"]), "count": jnp.where(kept, count, old["count"])}
    return state.replace(frozen={**state.frozen, REWARD_MEAN: new}), metrics
