"""Training callbacks: hooks users override to observe or steer a run.

The trainer calls every hook with itself as the first argument; a callback may
read anything from it and may set ``trainer.should_stop = True`` to end training
after the current step.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any

from easytrain.errors import EasytrainError

__all__ = ["EVENTS", "Callback", "CallbackList", "EarlyStopping", "MissingMetricError"]

EVENTS = ("on_train_begin", "on_train_end", "on_step_end", "on_log", "on_evaluate", "on_save", "on_exception",
          "on_job_update")


class Callback:
    """Base class; every hook is a no-op, so subclasses override only what they need.

    Callbacks that carry progress (counters, best values) also override
    ``state_dict``/``load_state_dict`` so that progress survives a resume.
    """

    def on_train_begin(self, trainer: Any) -> None:
        """Called once before the first step (also after a resume)."""

    def on_train_end(self, trainer: Any) -> None:
        """Called once after the last step, or after an early stop."""

    def on_step_end(self, trainer: Any, step: int) -> None:
        """Called after every optimizer step with the new global step."""

    def on_log(self, trainer: Any, step: int, logs: Mapping[str, float]) -> None:
        """Called whenever training metrics are reported."""

    def on_evaluate(self, trainer: Any, step: int, metrics: Mapping[str, float]) -> None:
        """Called after each evaluation with metrics such as ``eval_loss``."""

    def on_save(self, trainer: Any, step: int, checkpoint_dir: str) -> None:
        """Called after a checkpoint save has been started for ``step``."""

    def on_exception(self, trainer: Any, error: BaseException) -> None:
        """Called when training ends with ``error`` (a SIGTERM preemption included), before it propagates."""

    def on_job_update(self, trainer: Any, job: Mapping[str, Any]) -> None:
        """Called on the main process with a copy of the job record (``job.json``) after every change.

        To stop the run from here, call ``easytrain.jobs.current_job().request_stop(reason)``: the stop is
        then agreed by every process and the run ends with status "stopped".
        """

    def state_dict(self) -> dict[str, Any]:
        """JSON-serializable progress to store in checkpoints; empty when stateless."""
        return {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restores what ``state_dict`` returned."""


def _checked(callback: Any) -> Callback:
    """Rejects non-callbacks early, with a hint for the common class-not-instance slip."""
    if isinstance(callback, type) and issubclass(callback, Callback):
        raise TypeError(f"got the class {callback.__name__}; pass an instance, e.g. {callback.__name__}()")
    if not isinstance(callback, Callback):
        raise TypeError(f"callbacks must subclass easytrain.callbacks.Callback, got {type(callback).__name__}")
    return callback


class CallbackList(Callback):
    """Dispatches each event to its callbacks in the order they were added."""

    def __init__(self, callbacks: Iterable[Callback] = ()):
        """Creates the list.

        Args:
            callbacks: Callback instances, called in this order.
        """
        self.callbacks: list[Callback] = [_checked(callback) for callback in callbacks]

    def add(self, callback: Callback) -> None:
        """Appends ``callback``; it runs after those already present."""
        self.callbacks.append(_checked(callback))

    def call(self, event: str, trainer: Any, *args: Any) -> None:
        """Invokes hook ``event`` (one of ``EVENTS``) on every callback.

        Raises:
            ValueError: ``event`` is not a known hook name.
        """
        if event not in EVENTS:
            raise ValueError(f"unknown callback event {event!r}; expected one of {list(EVENTS)}")
        for callback in self.callbacks:
            getattr(callback, event)(trainer, *args)

    def on_train_begin(self, trainer: Any) -> None:
        self.call("on_train_begin", trainer)

    def on_train_end(self, trainer: Any) -> None:
        self.call("on_train_end", trainer)

    def on_step_end(self, trainer: Any, step: int) -> None:
        self.call("on_step_end", trainer, step)

    def on_log(self, trainer: Any, step: int, logs: Mapping[str, float]) -> None:
        self.call("on_log", trainer, step, logs)

    def on_evaluate(self, trainer: Any, step: int, metrics: Mapping[str, float]) -> None:
        self.call("on_evaluate", trainer, step, metrics)

    def on_save(self, trainer: Any, step: int, checkpoint_dir: str) -> None:
        self.call("on_save", trainer, step, checkpoint_dir)

    def on_exception(self, trainer: Any, error: BaseException) -> None:
        self.call("on_exception", trainer, error)

    def on_job_update(self, trainer: Any, job: Mapping[str, Any]) -> None:
        self.call("on_job_update", trainer, job)

    def state_dict(self) -> dict[str, Any]:
        """Per-callback states keyed by position and class name."""
        states = {_state_key(index, callback): callback.state_dict() for index, callback in enumerate(self.callbacks)}
        return {key: state for key, state in states.items() if state}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restores states saved by ``state_dict`` into the matching callbacks."""
        for index, callback in enumerate(self.callbacks):
            if (key := _state_key(index, callback)) in state:
                callback.load_state_dict(state[key])


def _state_key(index: int, callback: Callback) -> str:
    return f"{index}:{type(callback).__name__}"


class MissingMetricError(EasytrainError, KeyError):
    """A callback needs a metric the evaluation did not produce."""

    def __str__(self) -> str:  # KeyError would show the message repr()-quoted
        return str(self.args[0])


class EarlyStopping(Callback):
    """Stops training once ``metric`` has not improved for ``patience`` evaluations.

    Attributes:
        best: Best value seen so far (None before the first evaluation).
        best_step: Step at which ``best`` was reached.
        evaluations_without_improvement: Consecutive evaluations without improvement.
        stop_reason: Why training was stopped, or None.
    """

    def __init__(
        self, metric: str = "eval_loss", patience: int = 3, min_delta: float = 0.0, greater_is_better: bool = False
    ):
        """Configures what counts as improvement.

        Args:
            metric: Name in the evaluation metrics, e.g. "eval_loss".
            patience: Evaluations without improvement tolerated before stopping.
            min_delta: An improvement must exceed this margin to count.
            greater_is_better: True for metrics such as accuracy.
        """
        if patience < 1:
            raise ValueError(f"patience must be >= 1, got {patience}")
        if min_delta < 0:
            raise ValueError(f"min_delta must be >= 0, got {min_delta}")
        self.metric, self.patience, self.min_delta = metric, patience, min_delta
        self.greater_is_better = greater_is_better
        self.best: float | None = None
        self.best_step: int | None = None
        self.evaluations_without_improvement = 0
        self.stop_reason: str | None = None

    def is_improvement(self, value: float) -> bool:
        """True if ``value`` beats the best so far by more than ``min_delta``; NaN never does."""
        if math.isnan(value):
            return False
        if self.best is None:
            return True
        if self.greater_is_better:
            return value > self.best + self.min_delta
        return value < self.best - self.min_delta

    def on_evaluate(self, trainer: Any, step: int, metrics: Mapping[str, float]) -> None:
        if self.metric not in metrics:
            raise MissingMetricError(
                f"EarlyStopping monitors {self.metric!r}, but evaluation produced only {sorted(metrics)}; "
                "set EarlyStopping(metric=...) to one of these"
            )
        value = float(metrics[self.metric])
        if self.is_improvement(value):
            self.best, self.best_step, self.evaluations_without_improvement = value, step, 0
            return
        self.evaluations_without_improvement += 1
        if self.evaluations_without_improvement >= self.patience:
            self.stop_reason = (
                f"early stopping at step {step}: {self.metric} has not improved by more than "
                f"{self.min_delta} for {self.patience} evaluation(s); best {self.best} at step {self.best_step}"
            )
            trainer.should_stop = True

    def state_dict(self) -> dict[str, Any]:
        return {
            "best": self.best,
            "best_step": self.best_step,
            "evaluations_without_improvement": self.evaluations_without_improvement,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.best = state["best"]
        self.best_step = state["best_step"]
        self.evaluations_without_improvement = state["evaluations_without_improvement"]
