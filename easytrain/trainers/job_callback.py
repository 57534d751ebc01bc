"""`JobCallback`: every trainer's run reports into a job (`easytrain.jobs`) without any code of yours.

Added to every `BaseTrainer` by default. At the first hook it joins the running job (a `job` block or
decorated function around `train()`, or the `easytrain train` command), or opens its own in
`output_dir`. It reports progress as steps mapped into `[progress_start, progress_end]` (the file is
rewritten at least at every checkpoint), the latest train and eval metrics (each log replaces its split's record),
and turns a stop request into `trainer.should_stop`, so the loop checkpoints after the current step. While the
trainer trains, `log_metric` reaches the trainer's sinks, whoever opened the job. A job it opened it also ends:
completed (a stop requested during the last step had nothing left to stop), stopped, or failed with the error.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import numpy as np

from easytrain.arguments import TrainingArguments
from easytrain.callbacks import Callback
from easytrain.jobs import Job, activate, current_job, deactivate

__all__ = ["JobCallback"]


class JobCallback(Callback):
    """Reports a trainer's run into a job and ends the run when the job is asked to stop.

    Attributes:
        job: The job reported into during (and after) the last `train()`; None before it.
    """

    def __init__(self, arguments: TrainingArguments):
        self.arguments = arguments
        self.job: Job | None = None
        self._owned = False
        self._listener: Any = None
        self._replaced_reporter: Any = None
        self._lending = False  # whether the job's `log_metric` goes to this trainer's reporter
        self._step = self._total = 0

    def _percent(self, step: int) -> float:
        start, end = self.arguments.progress_start, self.arguments.progress_end
        return start + (end - start) * step / max(self._total, 1)

    # ------------------------------------------------------------------ begin and end
    def on_train_begin(self, trainer: Any) -> None:
        args, loop = self.arguments, trainer.loop
        self._step, self._total = loop.start_step, loop.data.total_steps
        running = current_job()
        self._owned = running is None
        if running is None:
            running = Job(args.output_dir, progress_start=args.progress_start, progress_end=args.progress_end,
                          stop_file=args.stop_file or None, report_to=["none"])
            running.open()
            activate(running)
        self.job = running
        # `log_metric` from a callback reaches this run's sinks, at its steps, also in a job opened around train()
        # (`easytrain train`'s, which has no sinks of its own, or a pipeline's)
        self._replaced_reporter, self._lending = running.use_reporter(loop.reporter), True
        self._listener = lambda record: trainer.callbacks.on_job_update(trainer, record)
        running.listeners.append(self._listener)
        running.begin(total_steps=self._total, initial_step=self._step, percent=self._percent(self._step))

    @property
    def stop_reason(self) -> str | None:
        """The job's stop request (the stop file, `request_stop`), which this callback turned into a stop."""
        return self.job.stop_reason if self.job is not None else None

    def _release(self) -> None:
        """Stop reporting into the job (it may still be ended later by a failure after `on_train_end`)."""
        if self.job is not None:
            if self._listener in self.job.listeners:
                self.job.listeners.remove(self._listener)
            if self._lending:  # the trainer closes its reporter next
                self.job.use_reporter(self._replaced_reporter)
                self._replaced_reporter, self._lending = None, False
            if self._owned:
                deactivate(self.job)

    def on_train_end(self, trainer: Any) -> None:
        if self.job is None:
            return
        stopped = self.job.stop_requested and self._step < self._total
        if not stopped and trainer.should_stop and self._step < self._total:  # a callback's (early stopping)
            self.job.end_early(trainer.callbacks.stop_reason() or "a callback set trainer.should_stop")
        if self._owned:
            self.job.finish("stopped" if stopped else "completed")
        else:  # the enclosing job ends when its block does; a stop request stays on it
            self.job.set_progress(self._percent(self._total if not stopped else self._step), step=self._step)
        self._release()

    def on_exception(self, trainer: Any, error: BaseException) -> None:
        if self.job is None:
            return
        if self._owned:  # also after `on_train_end`: the export at the end may still fail
            self.job.fail(error)
        self._release()

    # ------------------------------------------------------------------ during the run
    def on_step_end(self, trainer: Any, step: int) -> None:
        if self.job is None:
            return
        self._step = step
        self.job.set_progress(self._percent(step), step=step, total_steps=self._total)
        if self._stop_agreed(step):
            trainer.should_stop = True

    def _stop_agreed(self, step: int) -> bool:
        """Whether to stop after `step`. Several processes must stop at the same step (the checkpoint is a
        collective), so there process 0's answer is broadcast, at logging steps only, to keep it cheap."""
        if jax.process_count() == 1:
            return self.job.should_stop()
        if step % self.arguments.logging_steps and step != self._total:
            return False
        from jax.experimental import multihost_utils

        agreed = bool(multihost_utils.broadcast_one_to_all(np.int32(self.job.should_stop())))
        if agreed:
            self.job.request_stop("stop requested on process 0")
        return agreed

    def on_save(self, trainer: Any, step: int, checkpoint_dir: str) -> None:
        """After a kill, the file is at least as recent as the checkpoint the run will resume from."""
        if self.job is not None:
            self.job.set_progress(self._percent(step), step=step, total_steps=self._total)
            self.job.flush()

    def on_log(self, trainer: Any, step: int, logs: Mapping[str, float]) -> None:
        if self.job is not None:
            self.job.update_metrics("train", step, logs, complete=True)

    def on_evaluate(self, trainer: Any, step: int, metrics: Mapping[str, float]) -> None:
        if self.job is not None:
            self.job.update_metrics("eval", step, metrics, complete=True)
