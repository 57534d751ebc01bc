"""A callback that preempts the run from inside it, as a scheduler's SIGTERM would: the tests of a stopped run that
resumes share it."""

import os
import signal

from easytrain import Callback


class SigtermAt(Callback):
    """Sends this process `sig` (SIGTERM) at the end of `step`: the run checkpoints that step and stops
    (`TrainingPreempted`), through the real signal handler rather than `trainer.should_stop` (`runs.StopAt`)."""

    def __init__(self, step: int, sig: signal.Signals = signal.SIGTERM) -> None:
        self.step = step
        self.sig = sig

    def on_step_end(self, trainer, step) -> None:
        if step == self.step:
            os.kill(os.getpid(), self.sig)
