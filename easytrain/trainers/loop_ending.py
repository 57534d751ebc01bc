"""How a training run ends (mixed into `TrainLoop`): the final checkpoint, the best model, the export, a stop for a
signal, and closing what the run opened, whether it completed or failed.

Each step of the ending waits for what the one before started (a save completes before the error that stops the
run for a signal; saves in flight finish before the process may exit), so an ended run is resumable as it stands.
"""

from __future__ import annotations

import logging
from pathlib import Path

import jax

from easytrain.errors import CheckpointWriteError
from easytrain.trainers import run_end
from easytrain.trainers.preemption import TrainingPreempted

logger = logging.getLogger("easytrain")


class LoopEnding:
    """The end of `TrainLoop.run`: `finish` after the last step, `stop_for_signal` on a stop signal, `shut_down`
    however the loop ends. Reads the loop's state, parts, checkpoint manager, reporter, iterator and profiler."""

    def finish(self, step: int) -> None:
        self.checkpoint_now(step)
        if step == self.start_step:  # nothing trained (a finished run started again): its last train logs
            self.last_logs = run_end.saved_train_logs(self.parts.resumed_from, self.manager)
        run_end.log_early_stop(self.parts.callbacks, self.parts.owner.should_stop, step, self.data.total_steps)
        if self.args.load_best_model_at_end:
            self.load_best(step)
        self.parts.callbacks.on_train_end(self.parts.owner)
        if self.args.save_pretrained_at_end:
            self.parts.export(Path(self.args.output_dir) / "final_model")

    def checkpoint_now(self, step: int, *, force: bool = False) -> str | None:
        """Log pending metrics and complete a checkpoint of `step` (none under save_strategy='no').

        Returns the checkpoint's path. `force` saves even if `step` is not newer than the latest checkpoint.
        """
        if self.pending:
            self.log(step)
        if self.args.save_strategy == "no":
            return None
        self.save(step, force=force)  # a no-op for a step already saved
        self.manager.wait_until_finished()
        return str(self.manager.directory / str(step))

    def stop_for_signal(self, step: int) -> None:
        """Checkpoint the state after `step`, flush the logs, and leave with `PREEMPTED_EXIT_CODE`."""
        checkpoint = self.checkpoint_now(step, force=True)  # the process may be killed soon after: complete it
        error = TrainingPreempted(step, self.preemption.received or "a signal", checkpoint)
        logger.warning("%s", error)
        raise error

    def shut_down(self, *, failing: bool, status: str = "completed") -> None:
        """However the loop ends: close the logs and the data prefetch threads, let in-flight saves finish so
        they are complete (or cleanly absent), and give the host memory they freed back (`easytrain.heap`).

        A background save error is raised, unless the loop is already failing with another error (then
        it is logged), so it is never swallowed. `status` (completed, failed, stopped) goes to the trackers.
        A trace still running (`profile_steps` past the run's end) is written, as far as it got.
        """
        self.end_profile(failing)
        self.reporter.close(status)
        self.iterator.close()
        try:
            self.manager.wait_until_finished()
        except CheckpointWriteError as error:  # says what failed and what is kept: no traceback to add
            if not failing:
                raise
            logger.error("while training was stopping: %s", error)
        except Exception:
            if not failing:
                raise
            logger.exception("a background checkpoint save failed while training was stopping")
        self.heap.check(saving=False)

    def end_profile(self, failing: bool) -> None:
        """Write a trace the run ended inside of: after the device's work, unless the run is failing (its state
        may never be ready)."""
        if self.profiler.tracing and not failing:
            jax.block_until_ready(self.state)
        self.profiler.stop()

    def load_best(self, step: int) -> None:
        """Restore the best-ranked checkpoint's state (`load_best_model_at_end`)."""
        best = self.manager.best_step()
        if best is None:
            logger.warning("load_best_model_at_end: no checkpoint has %s; keeping the final state",
                           self.args.metric_for_best_model)
            return
        if best != step:
            self.state = self.parts.restore_best(best, self.state)
            self.parts.publish(self.state)
        logger.info("load_best_model_at_end: loaded step %d (%s)", best, self.args.metric_for_best_model)
        self.last_logs = {**self.last_logs, "best_step": best}
