"""Graceful stop on SIGTERM / SIGINT: finish the step, checkpoint, flush logs, exit with a known status.

Schedulers (SLURM, Kubernetes, Cloud TPU maintenance) send SIGTERM some seconds before killing a job.
The first signal only sets a flag that the loop reads between steps; a second one gets the default
action (the process dies at once; the last complete checkpoint is still intact, saves are atomic).

Multi-process runs must agree on the step at which every process saves, or the cooperative save would
deadlock. There SIGTERM goes through JAX's preemption service (`reached_preemption_sync_point`), which
picks one step for all processes; SIGINT keeps its default (KeyboardInterrupt) behaviour.
"""

from __future__ import annotations

import logging
import signal
import threading
from types import FrameType

import jax
from jax.experimental import multihost_utils

logger = logging.getLogger("easytrain")

#: Exit status of a run stopped by SIGTERM/SIGINT after saving its checkpoint (sysexits' EX_TEMPFAIL:
#: "temporary failure, try again"). Job scripts can requeue on it: the next start resumes.
PREEMPTED_EXIT_CODE = 75


class TrainingPreempted(SystemExit):
    """Training stopped on a signal after checkpointing `step`; exits the process with status 75.

    A `SystemExit`, so an uncaught one ends a script with the documented status instead of a traceback,
    and `except Exception` blocks around user code do not swallow it.
    """

    def __init__(self, step: int, signal_name: str, checkpoint: str | None):
        super().__init__(PREEMPTED_EXIT_CODE)
        self.step, self.signal_name, self.checkpoint = step, signal_name, checkpoint

    def __str__(self) -> str:
        saved = f"checkpoint {self.checkpoint}" if self.checkpoint else "no checkpoint (save_strategy='no')"
        return f"stopped by {self.signal_name} after step {self.step}; {saved}; exit status {PREEMPTED_EXIT_CODE}"


class PreemptionWatcher:
    """Context manager that turns stop signals into a flag the training loop polls once per step."""

    def __init__(self, signals: tuple[signal.Signals, ...] = (signal.SIGTERM, signal.SIGINT)):
        self.multi_process = jax.process_count() > 1
        self.signals = () if self.multi_process else signals  # multi-process: JAX's service handles SIGTERM
        self.received: str | None = None
        self._previous: dict[signal.Signals, object] = {}

    def __enter__(self) -> PreemptionWatcher:
        if threading.current_thread() is threading.main_thread():  # signal handlers live on the main thread
            for sig in self.signals:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc_info: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        sig = signal.Signals(signum)
        self.received = sig.name
        signal.signal(sig, self._previous.get(sig, signal.SIG_DFL))  # a second signal is not graceful
        logger.warning("%s received: finishing the current step, then checkpointing and exiting "
                       "(send it again to stop immediately)", sig.name)

    def should_stop(self, step: int) -> bool:
        """Whether to checkpoint and stop after `step`; called after every step, in every process."""
        if self.multi_process:
            if multihost_utils.reached_preemption_sync_point(step):
                self.received = "SIGTERM"
                return True
            return False
        return self.received is not None
