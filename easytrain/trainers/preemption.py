"""Graceful stop on SIGTERM / SIGINT: exit with a known status, nothing lost, from `train()`'s first line on.

Schedulers (SLURM, Kubernetes, Cloud TPU maintenance) send SIGTERM some seconds before killing a job. In the
training loop the first signal only sets a flag that the loop reads between steps: it finishes the step,
checkpoints, flushes its logs and exits. Before the first step (`train()` preparing the data, restoring the
model, claiming the output directory, compiling) the run stops at once where it writes nothing, else at the next
safe point, with the checkpoint it resumed from untouched (`easytrain.stop_signals`). A second signal gets the
default action (the process dies at once; the last complete checkpoint is still intact, saves are atomic).

Multi-process runs must agree on the step at which every process saves, or the cooperative save would
deadlock. There SIGTERM goes through JAX's preemption service (`reached_preemption_sync_point`), which
picks one step for all processes, the first one included; SIGINT keeps its default (KeyboardInterrupt) behaviour.
"""

from __future__ import annotations

import contextlib
import logging
import shlex
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jax
from jax.experimental import multihost_utils

from easytrain import distributed, stop_signals
from easytrain.arguments import TrainingArguments
from easytrain.checkpoint_dirs import CHECKPOINTS_DIRNAME, finalized_steps
from easytrain.config_io import ARGUMENTS_FILE
from easytrain.stop_signals import PREEMPTED_EXIT_CODE, SignalInterrupt

__all__ = ["PREEMPTED_EXIT_CODE", "PreemptionWatcher", "StoppedAfterTraining", "TrainingPreempted",
           "final_checkpoint", "final_step", "joins_other_processes", "resume_point", "stopping_after_training",
           "stopping_before_training"]

logger = logging.getLogger("easytrain")


class TrainingPreempted(SystemExit):
    """Training stopped on a signal after checkpointing `step`; exits the process with status 75.

    `during` names the phase of the set-up a run stopped in before its first step: then `step` is the step it
    resumed from (0 for a fresh run) and `checkpoint` that step's, untouched (None: it had none).

    A `SystemExit`, so an uncaught one ends a script with the documented status instead of a traceback,
    and `except Exception` blocks around user code do not swallow it.
    """

    def __init__(self, step: int, signal_name: str, checkpoint: str | None, during: str | None = None):
        super().__init__(PREEMPTED_EXIT_CODE)
        self.step, self.signal_name, self.checkpoint, self.during = step, signal_name, checkpoint, during

    def __str__(self) -> str:
        if self.during is not None:
            kept = f"checkpoint {self.checkpoint} untouched" if self.checkpoint else "no checkpoint yet"
            return (f"stopped by {self.signal_name} while {self.during}, before step {self.step + 1}: nothing "
                    f"trained; {kept}; exit status {PREEMPTED_EXIT_CODE}")
        saved = f"checkpoint {self.checkpoint}" if self.checkpoint else "no checkpoint (save_strategy='no')"
        return f"stopped by {self.signal_name} after step {self.step}; {saved}; exit status {PREEMPTED_EXIT_CODE}"


def resume_point(resume_from: tuple[Path, int] | None) -> tuple[int, str | None]:
    """The step and checkpoint a run stopped before its first step stays at: those it resumes from, or 0 and none."""
    if resume_from is None:
        return 0, None
    root, step = resume_from
    return step, str(root / str(step))


def joins_other_processes(args: TrainingArguments) -> bool:
    """Whether `distributed.initialize` will start JAX's multi-process runtime (whose preemption service then
    handles SIGTERM), read from the arguments and the environment before any JAX call."""
    explicit = (args.coordinator_address, args.num_processes, args.process_id)
    return (any(value is not None for value in explicit) or distributed.auto_detected_cluster() is not None
            or jax.distributed.is_initialized())


@contextlib.contextmanager
def stopping_before_training(resume_from: tuple[Path, int] | None) -> Iterator[None]:
    """`train()`'s whole body: stop signals are caught from here (single-process runs), the loop's
    `PreemptionWatcher` shares the flag, and a `SignalInterrupt` of the set-up becomes `TrainingPreempted` at
    `resume_point`. A catch `train()` started ends with it. The `easytrain` command's (caught from its start) goes on
    until `results.json` is written: a signal after the loop's last step (the final export) or in the final
    evaluation then stops the command too (`stopping_after_training`)."""
    started = stop_signals.catch(stop_signals.STOP_SIGNALS if jax.process_count() == 1 else ())
    try:
        yield
        if started and (name := stop_signals.received()) is not None:  # in the final export: nothing left to stop
            logger.warning("%s came after the last step, while the run finished (its final checkpoint is complete): "
                           "train() returns as usual", name)
    except SignalInterrupt as stop:
        step, checkpoint = resume_point(resume_from)
        error = TrainingPreempted(step, stop.signal_name, checkpoint, during=stop.during)
        logger.warning("%s", error)
        raise error from None
    finally:
        if started:
            stop_signals.release()


class StoppedAfterTraining(TrainingPreempted):
    """A stop signal after the last step: while the run finished (its final checkpoint, export) or the `easytrain`
    command evaluated the final model, before `results.json`. Exit status 75 like any stop. The message names the
    rerun that finishes the job: the command with `--resume_from_checkpoint latest`, or `--config` on the run's
    arguments.json (which records `latest`), evaluates from the final checkpoint and trains nothing more; the
    command unchanged would be refused where a fresh run left checkpoints. Without a checkpoint
    (save_strategy='no') a rerun trains again from step 0, under `--overwrite_output_dir` (its export, if any,
    would otherwise be refused)."""

    def __init__(self, step: int, signal_name: str, checkpoint: str | None, during: str, output_dir: str):
        super().__init__(step, signal_name, checkpoint, during=during)
        self.output_dir = output_dir

    def __str__(self) -> str:
        config = shlex.quote(str(Path(self.output_dir) / ARGUMENTS_FILE))
        if self.checkpoint:
            rerun = (f"checkpoint {self.checkpoint}; results.json not written: to evaluate and write it, training "
                     f"nothing more, add --resume_from_checkpoint latest to the command or run "
                     f"`easytrain train --config {config}`")
        else:
            rerun = ("no checkpoint (save_strategy='no'); results.json not written: a rerun trains again from step 0, "
                     "then evaluates and writes it: add --overwrite_output_dir to the command or run "
                     f"`easytrain train --config {config} --overwrite_output_dir`")
        return (f"stopped by {self.signal_name} while {self.during}, after the last step ({self.step}); {rerun}; "
                f"exit status {PREEMPTED_EXIT_CODE}")


@contextlib.contextmanager
def stopping_after_training(step: int, args: TrainingArguments,
                            during: str = "evaluating the final model") -> Iterator[None]:
    """The `easytrain` command's final evaluation (`during`), after `train()` returned at `step` of the run of
    `args`, as an `interruptible` section: a stop signal caught since the loop's last step ends the command on
    entering, one in the block at once, one right after it on leaving; all as `StoppedAfterTraining`, before
    `results.json`. Nothing happens where the command catches no signals (multi-process runs)."""
    try:
        with stop_signals.while_acting("stopping before results.json is written (exit status 75)"):
            stop_signals.check("the run finished (its final checkpoint, export)")
            with stop_signals.interruptible(during):
                yield
            stop_signals.check(during)
    except SignalInterrupt as stop:
        error = StoppedAfterTraining(step, stop.signal_name, final_checkpoint(args, step), stop.during,
                                     args.output_dir)
        logger.warning("%s", error)
        raise error from None


def final_checkpoint(args: TrainingArguments, step: int) -> str | None:
    """The complete checkpoint of the run's last `step` (the loop saves it unless save_strategy='no'), or None."""
    checkpoints = Path(args.output_dir) / CHECKPOINTS_DIRNAME
    return str(checkpoints / str(step)) if step in finalized_steps(checkpoints) else None


def final_step(trainer: Any) -> int:
    """The step a trainer's `train()` ended at, for `StoppedAfterTraining` (0 where it holds no state with a step).
    Read from the state it holds, never through `state`: that property would build a trainer whose `train()` did
    not (an override)."""
    step = getattr(vars(trainer).get("_state"), "step", None)
    return 0 if step is None else int(step)


class PreemptionWatcher:
    """Context manager that turns stop signals into a flag the training loop polls once per step.

    Inside `train()` (or the `easytrain` command) the signals are caught already: it shares that flag, so a
    signal of the set-up is not lost, and leaves the catch to its owner.
    """

    def __init__(self, signals: tuple[signal.Signals, ...] = stop_signals.STOP_SIGNALS):
        self.multi_process = jax.process_count() > 1
        self.signals = () if self.multi_process else signals  # multi-process: JAX's service handles SIGTERM
        self._synced: str | None = None
        self._owner = False
        self._plan = contextlib.ExitStack()

    def __enter__(self) -> PreemptionWatcher:
        self._owner = stop_signals.catch(self.signals)
        self._plan.enter_context(stop_signals.while_acting("finishing the current step, then checkpointing and "
                                                          "exiting"))
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._plan.close()
        if self._owner:
            stop_signals.release()
        self._owner = False

    @property
    def received(self) -> str | None:
        """The stop signal's name once one is acted on (this process's, or JAX's agreed SIGTERM), else None."""
        return self._synced or (None if self.multi_process else stop_signals.received())

    def stop_before_first_step(self, step: int, resumed_from: str | None, during: str) -> None:
        """Raise `TrainingPreempted` if a signal came before the first step (`during` it, e.g. the compile, which for a
        large model can outlast the grace window) of a run resumed from `resumed_from` (None: a fresh run): nothing
        trained or saved; the loop removes the logs a fresh run opened (`run_dir.remove_unstarted_logs`). A
        multi-process run goes on to JAX's sync point after its first step, where every process checkpoints."""
        if (name := self.received) is not None:
            error = TrainingPreempted(step, name, resumed_from, during=during)
            logger.warning("%s", error)
            raise error

    def should_stop(self, step: int) -> bool:
        """Whether to checkpoint and stop after `step`; called after every step, in every process."""
        if self.multi_process:
            if multihost_utils.reached_preemption_sync_point(step):
                self._synced = "SIGTERM"
                return True
            return False
        return self.received is not None
