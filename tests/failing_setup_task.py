"""Tasks failing on process 1 only (`test_process_failure_setup`): at set-up (its train file missing on its host), or
in a callback at step 3. A process left waiting logs the failure after 1 s, not 5, and ends itself 3 s later, not 60."""

import jax

from easytrain import BaseTrainer, Callback
from easytrain.trainers import process_failure

process_failure.EXIT_AFTER_SECONDS = 3.0
process_failure.WATCH_GRACE_SECONDS = 1.0


class MissingFileOnProcessOne(BaseTrainer):
    def configure_dataloaders(self):
        if jax.process_index() == 1:
            raise FileNotFoundError(f"train_file {self.arguments.train_file}: no such file on this host")
        return super().configure_dataloaders()


class RaiseAtStepThree(Callback):
    def on_step_end(self, trainer, step):
        if jax.process_index() == 1 and step == 3:
            raise RuntimeError("a callback failed on process 1 at step 3")


class CallbackFailsOnProcessOne(BaseTrainer):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.callbacks.add(RaiseAtStepThree())
