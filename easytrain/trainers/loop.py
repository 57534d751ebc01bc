"""The training loop: dispatch steps, and only at logging steps fetch metrics from the device.

Between logging steps nothing blocks on device values, so the host prepares batch N+1 while the
device runs step N.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import jax

from easytrain import placement, steps
from easytrain.errors import NonFiniteLossError
from easytrain.reporting import Reporter
from easytrain.trainers.preemption import PreemptionWatcher, TrainingPreempted

if TYPE_CHECKING:
    from easytrain.trainers.base import BaseTrainer

logger = logging.getLogger("easytrain")


def is_due(step: int, strategy: str, every: int, steps_per_epoch: int) -> bool:
    """Whether an eval/save with this strategy happens after optimizer update `step`."""
    if strategy == "steps":
        return step % every == 0
    if strategy == "epoch":
        return step % steps_per_epoch == 0
    return False


class TrainLoop:
    """One call of `BaseTrainer.train()`: restore, iterate, log, evaluate, checkpoint."""

    def __init__(self, trainer: "BaseTrainer"):
        self.trainer = trainer
        self.args = trainer.arguments
        self.data = trainer._data
        self.pending: list[tuple[int, dict[str, jax.Array], Any]] = []
        self.last_eval: dict[str, float] = {}
        self.last_eval_step = -1
        self.last_logs: dict[str, float] = {}
        self.last_saved_step = -1
        self.compile_seconds: float | None = None
        self.compile_logged = False
        self.window_start = time.perf_counter()

    # ------------------------------------------------------------------ run
    def run(self) -> dict[str, float]:
        trainer, args = self.trainer, self.args
        step = trainer._resume_from[1] if trainer._resume_from else 0
        self.iterator = self.data.train.iterator(step)
        if trainer.resumed_data_state:
            self.iterator.set_state(trainer.resumed_data_state)
        trainer.save_arguments()
        self.reporter = Reporter(output_dir=args.output_dir, report_to=args.report_to,
                                 total_steps=self.data.total_steps, initial_step=step,
                                 enabled=trainer.is_main_process, show_progress=not args.disable_progress_bar)
        self.manager = trainer.checkpoint_manager()
        self.last_saved_step = step if trainer._resume_from else -1
        try:
            with PreemptionWatcher() as self.preemption:
                trainer.callbacks.on_train_begin(trainer)
                step = self.iterate(step)
                self.finish(step)
        except BaseException:
            self.shut_down(failing=True)
            raise
        self.shut_down(failing=False)
        return self.last_logs

    def iterate(self, step: int) -> int:
        trainer, args, data = self.trainer, self.args, self.data
        while step < data.total_steps and not trainer.should_stop:
            batch = next(self.iterator)
            self.dispatch(trainer.to_global(batch))
            step += 1
            self.pending.append((step, self.metrics, batch["example_id"]))
            self.reporter.advance(step)
            if step % args.logging_steps == 0 or step == data.total_steps:
                self.log(step)
            if is_due(step, args.eval_strategy, args.eval_steps, data.steps_per_epoch):
                self.evaluate(step)
            if is_due(step, args.save_strategy, args.save_steps, data.steps_per_epoch):
                self.save(step)
            trainer.callbacks.on_step_end(trainer, step)
            if self.preemption.should_stop(step):
                self.stop_for_signal(step)
        return step

    def dispatch(self, global_batch: dict[str, jax.Array]) -> None:
        """Launch one step asynchronously; the first call also compiles (timed separately)."""
        trainer = self.trainer
        started = time.perf_counter()
        trainer._state, self.metrics = trainer._functions.train_step(trainer._state, global_batch)
        if self.compile_seconds is None:
            self.compile_seconds = time.perf_counter() - started
            logger.info("compiled the train step in %.2f s", self.compile_seconds)
            self.window_start = time.perf_counter()
            self.tokens_per_step = int(global_batch["input_ids"].size)

    def finish(self, step: int) -> None:
        trainer = self.trainer
        self.checkpoint_now(step)
        if self.args.load_best_model_at_end:
            self.load_best(step)
        trainer.callbacks.on_train_end(trainer)
        if self.args.save_pretrained_at_end:
            trainer.save_pretrained(Path(self.args.output_dir) / "final_model")

    def checkpoint_now(self, step: int, *, force: bool = False) -> str | None:
        """Log pending metrics and complete a checkpoint of `step` (none under save_strategy='no').

        Returns the checkpoint's path. `force` saves even if `step` is not newer than the latest checkpoint.
        """
        if self.pending:
            self.log(step)
        if self.args.save_strategy == "no":
            return None
        if self.last_saved_step != step:
            self.save(step, force=force)
        self.manager.wait_until_finished()
        return str(self.manager.directory / str(step))

    def stop_for_signal(self, step: int) -> None:
        """Checkpoint the state after `step`, flush the logs, and leave with `PREEMPTED_EXIT_CODE`."""
        checkpoint = self.checkpoint_now(step, force=True)  # the process may be killed soon after: complete it
        error = TrainingPreempted(step, self.preemption.received or "a signal", checkpoint)
        logger.warning("%s", error)
        raise error

    def shut_down(self, *, failing: bool) -> None:
        """However the loop ends: close the logs and the data prefetch threads, and let in-flight saves
        finish so they are complete (or cleanly absent).

        A background save error is raised, unless the loop is already failing with another error (then
        it is logged), so it is never swallowed.
        """
        self.reporter.close()
        self.iterator.close()
        try:
            self.manager.wait_until_finished()
        except Exception:
            if not failing:
                raise
            logger.exception("a background checkpoint save failed while training was stopping")

    def load_best(self, step: int) -> None:
        """Restore the best-ranked checkpoint's state (`load_best_model_at_end`)."""
        best = self.manager.best_step()
        if best is None:
            logger.warning("load_best_model_at_end: no checkpoint has %s; keeping the final state",
                           self.args.metric_for_best_model)
            return
        if best != step:
            target = placement.abstract_state(self.trainer.state_shardings, self.trainer._state)
            self.trainer._state, _, _ = self.manager.restore(best, abstract_state=target)
        logger.info("load_best_model_at_end: loaded step %d (%s)", best, self.args.metric_for_best_model)
        self.last_logs = {**self.last_logs, "best_step": best}

    # ------------------------------------------------------------------ events
    def log(self, step: int) -> None:
        """Fetch the metrics of every step since the last log in one transfer, and report them."""
        fetched = jax.device_get([metrics for _, metrics, _ in self.pending])
        elapsed = max(time.perf_counter() - self.window_start, 1e-9)
        logs = steps.summarize(fetched)
        logs["tokens_per_second"] = len(self.pending) * self.tokens_per_step / elapsed
        logs["epoch"] = step / self.data.steps_per_epoch
        if not self.compile_logged:
            logs["compile_seconds"], self.compile_logged = self.compile_seconds, True
        self.check_finite(step, fetched)
        self.pending = []
        self.last_logs = logs
        self.reporter.log(step, logs, split="train")
        self.trainer.callbacks.on_log(self.trainer, step, logs)
        self.window_start = time.perf_counter()

    def check_finite(self, current_step: int, fetched: list[dict[str, Any]]) -> None:
        """Under `non_finite_policy='stop'`: checkpoint the (finite) current state and raise.

        Non-finite updates were skipped inside the step, so the state in memory is finite; it is saved
        under its own step, with the matching data position.
        """
        if self.args.non_finite_policy != "stop":
            return
        for (step, _, example_ids), metrics in zip(self.pending, fetched):
            if int(metrics["skipped"]):
                self.save(current_step, force=True)
                self.manager.wait_until_finished()  # the checkpoint must be complete before the error ends the run
                raise NonFiniteLossError(
                    f"non-finite loss or gradient at step {step} (batch example ids {list(map(int, example_ids))}); "
                    f"that update was skipped and the state after step {current_step} was checkpointed. Inspect "
                    f"those examples, lower learning_rate, or set non_finite_policy='skip'.")

    def evaluate(self, step: int) -> None:
        trainer = self.trainer
        self.last_eval, self.last_eval_step = trainer.evaluate(), step
        self.reporter.log(step, self.last_eval, split="eval")
        trainer.callbacks.on_evaluate(trainer, step, self.last_eval)

    def save(self, step: int, force: bool = False) -> None:
        trainer = self.trainer
        saved = self.manager.save(step, state=trainer._state, data_state=self.iterator.get_state(),
                                  run_info=trainer.run_info(), force=force,
                                  progress={"callbacks": trainer.callbacks.state_dict()},
                                  metrics=self.last_eval if self.last_eval_step == step else None)
        if saved:
            self.last_saved_step = step
            trainer.callbacks.on_save(trainer, step, str(self.manager.directory / str(step)))
