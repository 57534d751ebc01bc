"""Training callbacks: hooks users override to observe or steer a run.

The trainer calls every hook with itself as the first argument; a callback may
read anything from it and may set ``trainer.should_stop = True`` to end training
after the current step.

Within a step the hooks run in the order ``on_log`` (where the step logs at once), ``on_evaluate``, ``on_step_end``,
then the checkpoint and ``on_save``: the checkpoint of step N holds every callback's state after step N's
``on_log``, ``on_evaluate`` and ``on_step_end`` (what ``on_save`` changes is in the next checkpoint only).

Checkpoints store each callback's ``state_dict()`` under ``"<k>:<ClassName>"``, ``k`` counting the callbacks of
that class (``"0:EarlyStopping"`` is the first ``EarlyStopping``, wherever it is in the list). So on resume a
callback finds its own state however many callbacks of other classes were added or removed; those of one class
are matched in order, when their number is the one saved. A callback that overrides ``load_state_dict`` and gets
no state back logs a warning and starts afresh.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from easytrain.best_metric_direction import HIGHER_IS_BETTER, lower_is_better, names_a
from easytrain.errors import EasytrainError

logger = logging.getLogger("easytrain")

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
        """Called after every optimizer step with the new global step: after that step's evaluation, before its
        checkpoint, which holds what this hook changed (the ``state_dict``, a stop it requested)."""

    def on_log(self, trainer: Any, step: int, logs: Mapping[str, float]) -> None:
        """Called whenever training metrics are reported; ``logs`` is this callback's own copy.

        The log of ``step`` waits until the next step is dispatched (the device is never left idle while the host
        logs), so ``trainer.model`` and ``trainer.state`` may already hold step ``step + 1``'s weights here (they
        hold ``step``'s only where the step is also evaluated, saved or the last, or in a multi-process run). A
        callback that needs the weights ``logs`` describe reads them in ``on_step_end``, which runs right after
        ``step`` and before the next dispatch."""

    def on_evaluate(self, trainer: Any, step: int, metrics: Mapping[str, float]) -> None:
        """Called after each evaluation with metrics such as ``eval_loss`` (this callback's own copy)."""

    def on_save(self, trainer: Any, step: int, checkpoint_dir: str) -> None:
        """Called after a checkpoint save has been started for ``step``, the last hook of that step."""

    def on_exception(self, trainer: Any, error: BaseException) -> None:
        """Called when training ends with ``error`` (a SIGTERM preemption included), before it propagates. An
        ``Exception`` raised here is logged and noted on ``error``, which is still the one raised; the other
        callbacks' ``on_exception`` run all the same."""

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
    """Dispatches each event to its callbacks in the order they were added.

    Each callback gets its own copy of the ``logs``/``metrics`` dict: a callback may change it or add keys for
    itself, but what the run records (metrics files, ``results.json``, ``job.json``, the checkpoints' metrics that
    rank the best one) and what the other callbacks see stay the trainer's values.
    """

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
        if event == "on_exception":
            return self.on_exception(trainer, *args)
        for callback in self.callbacks:  # each its own copy of a dict: one that edits it alters no record, no peer
            getattr(callback, event)(trainer, *(dict(arg) if isinstance(arg, dict) else arg for arg in args))

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
        """Every callback's ``on_exception`` runs, also after one raises: a cleanup hook's own bug neither skips
        the others (the job record's among them) nor replaces ``error``, the run's failure that propagates. Such a
        bug is logged with its traceback and noted on ``error``."""
        for callback in self.callbacks:
            try:
                callback.on_exception(trainer, error)
            except Exception as hook_error:
                _report_failed_handler(callback, hook_error, error)

    def on_job_update(self, trainer: Any, job: Mapping[str, Any]) -> None:
        self.call("on_job_update", trainer, job)

    def stop_reason(self) -> str | None:
        """Why training was stopped: the first ``stop_reason`` a callback gives (``EarlyStopping``'s, a stop
        request's), or None."""
        for callback in self.callbacks:
            if isinstance(reason := getattr(callback, "stop_reason", None), str) and reason:
                return reason
        return None

    def state_dict(self) -> dict[str, Any]:
        """Per-callback states keyed ``"<k>:<ClassName>"`` (the k-th callback of that class). Empty states are
        kept for callbacks that restore state, so that those of one class still count as many on resume."""
        states = {}
        for index, callback in enumerate(self.callbacks):
            if (state := callback.state_dict()) or _restores_state(callback):
                states[_state_key(callback, self.callbacks[:index])] = state
        return states

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restores each callback's state saved by ``state_dict``, matched by class, then in order among the
        callbacks of that class. Also reads checkpoints keyed ``"<position in the list>:<ClassName>"`` (before
        the keys counted per class), where the number of callbacks of each class is unchanged."""
        saved = _saved_by_class(state)
        for name, callbacks in _by_class(self.callbacks).items():
            entries = saved.get(name, [])
            if len(entries) != len(callbacks):
                _warn_afresh(name, len(callbacks), len(entries), sorted(state))
                continue
            for callback, entry in zip(callbacks, entries):
                if entry:
                    callback.load_state_dict(entry)


def _report_failed_handler(callback: Callback, hook_error: Exception, error: BaseException) -> None:
    """Logs a callback's failing ``on_exception`` and notes it on the run's ``error``, which stays the one raised."""
    where = f"{type(callback).__name__}.on_exception"
    logger.error("%s raised %s: %s (the run's own error, %s, is the one raised)", where, type(hook_error).__name__,
                 hook_error, type(error).__name__, exc_info=hook_error)
    error.add_note(f"while handling it, {where} raised {type(hook_error).__name__}: {hook_error} (logged)")


def _restores_state(callback: Callback) -> bool:
    """Whether `callback` has progress to restore (its class overrides ``load_state_dict``)."""
    return type(callback).load_state_dict is not Callback.load_state_dict


def _state_key(callback: Callback, before: Sequence[Callback]) -> str:
    name = type(callback).__name__
    return f"{sum(type(other).__name__ == name for other in before)}:{name}"


def _by_class(callbacks: Sequence[Callback]) -> dict[str, list[Callback]]:
    """The callbacks that restore state, by class name, in list order."""
    found: dict[str, list[Callback]] = {}
    for callback in callbacks:
        if _restores_state(callback):
            found.setdefault(type(callback).__name__, []).append(callback)
    return found


def _saved_by_class(state: Mapping[str, Any]) -> dict[str, list[Any]]:
    """Saved states by class name, ordered by their key's number (per class, or a list position in older
    checkpoints: the order among one class is the same)."""
    found: dict[str, list[tuple[int, Any]]] = {}
    for key, value in state.items():
        number, _, name = str(key).partition(":")
        if number.isdigit() and name:
            found.setdefault(name, []).append((int(number), value))
    return {name: [value for _, value in sorted(entries, key=lambda entry: entry[0])]
            for name, entries in found.items()}


def _warn_afresh(name: str, count: int, saved: int, keys: list[str]) -> None:
    """A resumed callback that silently restarted (early stopping's patience, say) would change the run."""
    if saved:
        reason = (f"the checkpoint holds {saved} saved {name} state(s) for this run's {count} {name} callback(s), "
                  "so which is whose cannot be told")
    else:
        reason = f"the checkpoint holds no {name} state (it holds {keys or 'no callback state'})"
    logger.warning("callback %s: %s; %s starts afresh, as in a new run.", name, reason,
                   "it" if count == 1 else "they")


class MissingMetricError(EasytrainError, KeyError):
    """A callback needs a metric the evaluation did not produce."""

    def __str__(self) -> str:  # KeyError would show the message repr()-quoted
        return str(self.args[0])


def direction_of(metric: str) -> bool | None:
    """`greater_is_better` by a metric's name, as `metric_for_best_model` infers it: lower for a loss, a perplexity,
    an error, a distance or a divergence, higher for an accuracy, an F1, ... (docs/metrics.md); None for a name of
    neither kind."""
    if lower_is_better(metric):
        return False
    return True if names_a(metric, HIGHER_IS_BETTER) else None


class EarlyStopping(Callback):
    """Stops training once ``metric`` has not improved for ``patience`` evaluations.

    The stop is part of the checkpointed state: a run resumed after it (``resume_from_checkpoint: latest``, a
    requeued job) is finished and trains nothing (also with a smaller ``patience``, which would have stopped it
    sooner); resumed with a larger ``patience`` it trains on, counting on from the evaluations without improvement it
    had. The stop reason always names the ``patience`` in force. State saved for another ``metric`` or
    ``greater_is_better`` is not restored (a warning; early stopping starts afresh); a changed ``min_delta`` applies
    from then on.

    Attributes:
        best: Best value seen so far (None before the first evaluation).
        best_step: Step at which ``best`` was reached.
        evaluations_without_improvement: Consecutive evaluations without improvement.
        last_evaluation_step: Step of the last evaluation counted (None before the first).
        stop_reason: Why training was stopped, or None.
    """

    def __init__(self, metric: str = "eval_loss", patience: int = 3, min_delta: float = 0.0,
                 greater_is_better: bool | None = None):
        """Configures what counts as improvement.

        Args:
            metric: Name in the evaluation metrics, e.g. "eval_loss".
            patience: Evaluations without improvement tolerated before stopping.
            min_delta: An improvement must exceed this margin to count.
            greater_is_better: True for metrics such as accuracy. None: the run's `greater_is_better` where
                ``metric`` is its `metric_for_best_model` (`rank_as_run`), else from the name (`direction_of`;
                lower-is-better, with a warning, for a name of neither kind).
        """
        if patience < 1:
            raise ValueError(f"patience must be >= 1, got {patience}")
        if min_delta < 0:
            raise ValueError(f"min_delta must be >= 0, got {min_delta}")
        self.metric, self.patience, self.min_delta = metric, patience, min_delta
        named = direction_of(metric)
        # A name of no known direction keeps this callback's old default, lower-is-better (warned of as training
        # begins, unless `rank_as_run` settles it: `metric_for_best_model` ranks such a name higher).
        self.greater_is_better = bool(named) if greater_is_better is None else greater_is_better
        self._direction_given = greater_is_better is not None
        self._direction_unknown = greater_is_better is None and named is None
        self.best: float | None = None
        self.best_step: int | None = None
        self.evaluations_without_improvement = 0
        self.stop_reason: str | None = None
        self.last_evaluation_step: int | None = None
        self._restored = False  # whether `load_state_dict` gave this run its progress (a resume)

    def rank_as_run(self, metric: str, greater_is_better: bool) -> None:
        """Rank `metric`, the run's `metric_for_best_model`, in the run's direction if this callback watches it and
        was given none: early stopping, checkpoint retention and `load_best_model_at_end` then agree."""
        if metric == self.metric and not self._direction_given:
            self.greater_is_better, self._direction_unknown = greater_is_better, False

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
        self.last_evaluation_step = step
        if self.is_improvement(value):
            self.best, self.best_step, self.evaluations_without_improvement = value, step, 0
            return
        self.evaluations_without_improvement += 1
        if self.evaluations_without_improvement >= self.patience:
            self.stop_reason = self.reason()
            trainer.should_stop = True

    def reason(self) -> str:
        """Why the count stops training under this callback's ``patience`` (the one in force, also after a resume)."""
        at = "" if self.last_evaluation_step is None else f" at step {self.last_evaluation_step}"
        return (f"early stopping{at}: {self.metric} has not improved by more than {self.min_delta} for "
                f"{self.evaluations_without_improvement} evaluation(s), patience {self.patience}; best {self.best} "
                f"at step {self.best_step}")

    def on_train_begin(self, trainer: Any) -> None:
        """A run resumed with as many evaluations without improvement as ``patience`` (or more: a smaller patience
        than the stopped run's) is finished: it stops before its first step, with a reason naming this patience. With
        a larger one it trains on from the evaluations counted. The stopped run's own reason is never reused: it
        named that run's patience."""
        if self._direction_unknown:
            logger.warning("EarlyStopping(%r) ranks a name of no known direction lower-is-better: pass "
                           "greater_is_better=True if a larger value is better.", self.metric)
            self._direction_unknown = False  # once
        restored, self._restored = self._restored, False
        self.stop_reason = None
        if restored and self.evaluations_without_improvement >= self.patience:
            self.stop_reason = self.reason()
            trainer.should_stop = True

    def state_dict(self) -> dict[str, Any]:
        return {
            "best": self.best,
            "best_step": self.best_step,
            "evaluations_without_improvement": self.evaluations_without_improvement,
            "metric": self.metric,
            "greater_is_better": self.greater_is_better,
            "stop_reason": self.stop_reason,
            "last_evaluation_step": self.last_evaluation_step,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restores the progress, unless it was counted for another metric or direction (older checkpoints do not
        say: theirs is taken as this one's)."""
        saved = (state.get("metric", self.metric), state.get("greater_is_better", self.greater_is_better))
        if saved != (self.metric, self.greater_is_better):
            logger.warning("EarlyStopping: the checkpoint's state monitored %r (greater_is_better=%s), this run "
                           "monitors %r (greater_is_better=%s); early stopping starts afresh, as in a new run.",
                           *saved, self.metric, self.greater_is_better)
            return
        self.best = state["best"]
        self.best_step = state["best_step"]
        self.evaluations_without_improvement = state["evaluations_without_improvement"]
        self.last_evaluation_step = state.get("last_evaluation_step")  # None in older checkpoints
        self._restored = True
