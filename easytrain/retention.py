"""Checkpoint retention: keep the newest N checkpoints and, when ranking by a metric, the best one too.

Orbax's `best_fn` with `max_to_keep` means "the best N", which can delete the newest checkpoint; the
union of two preservation policies keeps both guarantees, and a missing or NaN metric never ranks.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from typing import Any

from orbax.checkpoint import checkpoint_managers as ocp_policies


def metric_value(metrics: Mapping[str, Any] | None, name: str) -> float:
    """``metrics[name]`` as a float; NaN when absent so it never ranks as best."""
    value = (metrics or {}).get(name)
    return math.nan if value is None else float(value)


def best_index(values: list[float], greater_is_better: bool) -> int | None:
    """Index of the best finite value (the earliest on ties), or None if there is none."""
    finite = [(value, index) for index, value in enumerate(values) if math.isfinite(value)]
    if not finite:
        return None
    pick = max if greater_is_better else min
    return pick(finite, key=lambda item: item[0])[1]


@dataclasses.dataclass
class KeepBest:
    """Orbax preservation policy keeping the one checkpoint with the best metric.

    Unlike Orbax's ``BestN``, checkpoints whose metric is missing or NaN are
    never chosen, even when no checkpoint has the metric yet.
    """

    metric: str
    greater_is_better: bool = False

    def should_preserve(self, checkpoints: Sequence[Any], *, context: Any) -> list[bool]:
        values = [metric_value(info.metrics, self.metric) for info in checkpoints]
        best = best_index(values, self.greater_is_better)
        return [index == best for index in range(len(checkpoints))]


def preservation_policy(max_to_keep: int | None, best_metric: str | None, greater_is_better: bool) -> Any:
    """Keeps the newest ``max_to_keep`` steps, plus the best one when ranking.

    Orbax's ``best_fn`` + ``max_to_keep`` means "the best N", which can delete
    the newest checkpoint; the union of two policies keeps both guarantees.
    """
    policies: list[Any] = [ocp_policies.LatestN(n=max_to_keep)]
    if best_metric is not None:
        policies.append(KeepBest(best_metric, greater_is_better))
    return ocp_policies.AnyPreservationPolicy(policies)
