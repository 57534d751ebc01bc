"""The training loop: dispatch iterations, and only at logging steps fetch metrics from the device.

Between logging steps nothing blocks on device values, so the host prepares batch N+1 while the
device runs step N; a logging step's metrics are fetched once the step after it is queued. The loop gets
every collaborator explicitly (`LoopParts`); it knows no trainer class and no batch field by name. How a run ends
(final checkpoint, best model, export, closing) is `loop_ending.LoopEnding`'s.
"""

from __future__ import annotations

import contextlib
import logging
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

import jax

from easytrain import flops, heap, metrics as metrics_lib, profiling, stop_signals, throughput
from easytrain.data.position import position_mismatch
from easytrain.errors import OutputDirError, TrainedAlreadyError
from easytrain.jobs import outcome_of
from easytrain.memory_plan import MemoryPlan
from easytrain.reporting import Reporter
from easytrain.trainers import due, non_finite, process_failure, run_dir, run_end
from easytrain.trainers.loop_ending import LoopEnding
from easytrain.trainers.loop_parts import HostBatch, LoopParts
from easytrain.trainers.preemption import PreemptionWatcher

logger = logging.getLogger("easytrain")
#: Steps the host may dispatch ahead of the device. Past 32 queued programs per device, XLA:CPU's runtime
#: blocks a launch on one of the threads its queued collectives need, and a multi-device CPU mesh deadlocks.
MAX_STEPS_IN_FLIGHT = 16


#: Eval batches dispatched between waits (each queues its step and its metrics' merges), for the reason of
#: `MAX_STEPS_IN_FLIGHT`.
EVAL_BATCHES_IN_FLIGHT = 4


def evaluate_batches(eval_step: Callable[[Mapping[str, jax.Array], int], dict[str, Any]],
                     batches: Iterable[Mapping[str, jax.Array]]) -> dict[str, float]:
    """`eval_` metrics over every batch (`eval_step(batch, batch_index)`, `steps.bound_eval`): merged on device
    (exact, whatever the batch size), fetched once."""
    merged = None
    for index, batch in enumerate(batches, start=1):
        values = eval_step(batch, index - 1)  # the batch's key: `easytrain.steps.eval_key`
        merged = values if merged is None else metrics_lib.merge_all(merged, values)
        if index % EVAL_BATCHES_IN_FLIGHT == 0:
            jax.block_until_ready(merged)
    return metrics_lib.reduce_window([metrics_lib.fetch(merged)], prefix="eval_")


class TrainLoop(LoopEnding):
    """One call of `train()`: iterate, log, evaluate, checkpoint, from a given state and data position."""

    def __init__(self, parts: LoopParts):
        self.parts = parts
        self.args = parts.arguments
        self.data = parts.data
        self.pending: list[tuple[int, dict[str, Any], Any, throughput.BatchCounts]] = []
        self.deferred: int | None = None  # a logging step whose log waits for the next dispatch (`iterate`)
        self.last_eval: dict[str, float] = {}
        self.last_eval_step = -1
        self.last_logs: dict[str, float] = {}
        self.last_saved_step = -1
        self.heap = heap.TrimAfterSaves()
        self.compile_seconds: float | None = None
        self.iterations = 0  # dispatched (or tried): the run's own record that it trained, whatever `state.step` counts
        self.memory_plan: MemoryPlan | None = None
        self.compile_logged = False
        self.window_start = time.perf_counter()
        self.profiler = profiling.StepProfiler(
            profiling.trace_dir(self.args.output_dir, jax.process_index(), jax.process_count()),
            self.args.profile_start_step, self.args.profile_steps)

    # ------------------------------------------------------------------ run
    def run(self, state: Any, start_step: int, data_state: dict[str, Any] | None, resumed: bool,
            trackers: Sequence[Any] | None = None) -> dict[str, float]:
        """Train from `state` at `start_step`; `trackers` are the W&B / MLflow sinks `trackers_then_claim`
        opened (None: the reporter opens them)."""
        parts, args = self.parts, self.args
        self.state, self.start_step, self.iterator = state, start_step, self.data.train.iterator(start_step)
        if data_state:
            self.restore_data_position(data_state)
        run_end.warn_if_nothing_left(resumed, start_step, self.data.total_steps)
        self.reporter = Reporter(output_dir=args.output_dir, report_to=args.report_to,
                                 total_steps=self.data.total_steps, initial_step=start_step,
                                 enabled=parts.is_main_process, show_progress=not args.disable_progress_bar,
                                 run_config=args.to_dict(), trackers=trackers)
        self.manager, self.last_saved_step = parts.checkpoints, start_step if resumed else -1
        # Logs another's failure; ends this process if, after it, no batch is drawn and no save starts or ends for a
        # while (a save being written, the final wait for it included, has longer), unless this process failed too.
        with process_failure.watching(self.progress, saving=self.manager.is_saving):
            try:
                with PreemptionWatcher() as self.preemption:
                    parts.callbacks.on_train_begin(parts.owner)
                    step = self.iterate(start_step)
                    self.finish(step)
            except BaseException as error:
                process_failure.publish_failure(error)  # first: the other processes look for it when they fail
                self.log_due_steps()
                try:
                    parts.callbacks.on_exception(parts.owner, error)
                finally:  # even if a callback fails too
                    self.shut_down(failing=True, status=outcome_of(error))
                    if parts.resumed_from is None and self.compile_seconds is None:  # a fresh run that trained nothing
                        run_dir.remove_unstarted_logs(Path(args.output_dir), parts.is_main_process,
                                                      self.reporter.written_logs)
                        if (Path(args.output_dir) / "tensorboard").is_symlink():  # a plain one went whole
                            self.profiler.take_back()
                process_failure.reraise_naming_others(error)  # `error`, or one naming another that failed first
            self.shut_down(failing=False)
        return self.last_logs

    def check_not_run(self) -> None:
        """`train()` runs once per trainer: a second call would count steps and read data from the run's start again
        while the state kept its updates (the same steps logged twice, the final save skipped as already written).
        A loop that dispatched nothing (stopped before its first step) left the state as it was: it may run again.
        A larger max_steps is named only where the run reached its last step: one stopped before resumes as it is."""
        if self.iterations:
            reached, total = self.start_step + self.iterations, self.data.total_steps
            finished = reached >= total
            raise TrainedAlreadyError(
                f"train() has already run on this trainer (it trained from step {self.start_step} to step "
                f"{reached}{'' if finished else f' of {total}'}); to train on, build a new trainer with "
                f"resume_from_checkpoint='latest'{' and a larger max_steps' if finished else ''}.")

    def progress(self) -> tuple[int, bool]:
        """What changes as the steps go on (read by `process_failure`'s watcher): batches drawn, saves running."""
        return self.iterator.step, self.manager.is_saving()

    def log_due_steps(self) -> None:
        """On a failure: log the trained steps up to the last whose log was due (deferred behind the next dispatch), as
        far as their metrics can still be fetched; a resume truncates records past its checkpoint."""
        if (step := self.deferred) is not None:
            try:
                self.log(step, checking=False)
            except Exception:  # the failure may be the device's own: the run's error is the one to raise
                logger.debug("the metrics of steps up to %d could not be logged", step, exc_info=True)

    def restore_data_position(self, data_state: dict[str, Any]) -> None:
        """Continue the data where the checkpoint left it. Under `allow_data_order_change`, a position saved for
        other data (one the resume could not compare: `resume.check_data_position`) is dropped instead: the data
        starts afresh at the restored step, in the new data's order."""
        if self.args.allow_data_order_change and (diffs := position_mismatch(data_state, self.iterator.get_state())):
            logger.warning("the training data changed since the checkpoint (%s): allow_data_order_change is set, so "
                           "the data starts afresh at step %d, in the new data's order", "; ".join(diffs),
                           self.iterator.step)
            return
        self.iterator.set_state(data_state)

    def iterate(self, step: int) -> int:
        """Dispatch steps; a logging step's metrics are fetched only once the next step is queued behind it
        (so the device never idles while the host logs), unless an evaluation, a save or the end follows it,
        which wait for the device anyway. `on_log` of a step therefore runs after the next step's dispatch.

        A step's hooks run in the order log, evaluate, `on_step_end`, save: a checkpoint of step N holds every
        callback's state after step N's log, evaluation and `on_step_end` (a stop one requests included), so a run
        resumed there calls those as often as one that never stopped. A log is deferred only at a step not saved
        here; a stop's or the end's checkpoint (`checkpoint_now`) logs what is pending first."""
        parts, args, data = self.parts, self.args, self.data
        while step < data.total_steps and not parts.owner.should_stop:
            self.profiler.before_step(step + 1)
            with self.profiler.annotate(step + 1):
                batch = next(self.iterator)
                counts = self.count(batch)
                if self.compile_seconds is None and counts.model_flops:
                    flops.hardware_peak()  # on CPU a timed matmul: taken now, while nothing runs, not at the first log
                metrics = self.dispatch(parts.to_device(batch))
            step += 1
            self.pending.append((step, metrics, batch.get("example_id"), counts))
            if self.deferred is not None:  # pending holds steps up to it, and the next, already on the device
                self.log(self.deferred, overlapping=True)
            if len(self.pending) > MAX_STEPS_IN_FLIGHT:  # wait (no transfer) for the step that far back
                jax.block_until_ready(self.pending[-MAX_STEPS_IN_FLIGHT - 1][1])
            self.reporter.advance(step)
            if self.profiler.ends_at(step):
                with self.off_the_clock():  # waits for the traced steps' device work, then writes the trace
                    self.profiler.stop()
            evaluating = due.is_due(step, args.eval_strategy, args.eval_steps, data.steps_per_epoch)
            saving = due.is_due(step, args.save_strategy, args.save_steps, data.steps_per_epoch)
            # A checkpoint ends a window too: steps between the last log and a save would not be logged by a run
            # resumed from that save, whose next window would then hold fewer steps than this run's.
            if step % args.logging_steps == 0 or step == data.total_steps or saving:
                # Several processes log at once: deferred, a 2-process CPU run deadlocked in a collective.
                if evaluating or saving or step == data.total_steps or jax.process_count() > 1:
                    self.log(step)
                else:
                    self.deferred = step
            if evaluating:
                with self.off_the_clock():
                    self.evaluate(step)
            parts.callbacks.on_step_end(parts.owner, step)  # before the save: its checkpoint holds what this hook did
            if saving:
                with self.off_the_clock():
                    self.save(step)
            if self.preemption.should_stop(step):
                self.stop_for_signal(step)
        return step

    def count(self, batch: HostBatch) -> throughput.BatchCounts:
        """Host-side counts of this step's batch for the throughput logs (no device values read)."""
        parts = self.parts
        return throughput.BatchCounts(parts.count_tokens(batch), *parts.count_token_slots(batch),
                                      parts.model_flops(batch), parts.count_samples(batch))

    @contextlib.contextmanager
    def off_the_clock(self) -> Iterator[None]:
        """Evaluation and checkpointing inside a logging window do not count toward its step time.

        Waits for the dispatched steps first (the evaluation or save would wait for them anyway), so
        their compute stays on the window's clock.
        """
        jax.block_until_ready(self.state)
        started = time.perf_counter()
        try:
            yield
        finally:
            self.window_start += time.perf_counter() - started

    def dispatch(self, global_batch: Mapping[str, jax.Array]) -> dict[str, Any]:
        """Launch one iteration asynchronously; the first call also plans memory and compiles (timed separately)."""
        started, first = time.perf_counter(), self.compile_seconds is None
        if first:  # raises, before anything runs, if the step cannot fit
            with stop_signals.while_acting("stopping before the first step once the step is compiled, nothing trained"):
                self.memory_plan = self.parts.plan_memory(self.state, global_batch)
            self.preemption.stop_before_first_step(self.start_step, self.parts.resumed_from, "compiling the train step")
        self.iterations += 1  # before: an iteration that fails may have donated the state already
        self.state, metrics = self.parts.iteration(self.state, global_batch)
        self.parts.publish(self.state)
        if first:
            self.compile_seconds = time.perf_counter() - started
            planned = f"; it holds {self.memory_plan.describe()}" if self.memory_plan else ""
            logger.info("compiled the train step in %.2f s%s", self.compile_seconds, planned)
            self.window_start = time.perf_counter()
            self.settle_claim()
        return metrics

    def settle_claim(self) -> None:
        """Once the first step is done, not merely dispatched (a runtime failure of it, or, in a multi-process run,
        another process that never dispatched it, keeps it from ending), delete what the claim of output_dir held
        of the older run (`held_run`); off the clock. Only where the claim holds something: no wait otherwise."""
        if self.parts.settle_claim is not None:
            with self.off_the_clock():
                self.parts.settle_claim()

    # ------------------------------------------------------------------ events
    def log(self, step: int, overlapping: bool = False, checking: bool = True) -> None:
        """Fetch the metrics of every step since the last log up to `step` in one transfer, merge and report them.

        The next window starts when this one's metrics arrive if the log `overlapping`ly runs while the next step
        computes (a deferred log): the next dispatch waits for the log, so its time is the loop's, and the part
        of the next step it overlapped belongs to no window otherwise. A log with nothing queued behind it (an
        evaluation, a save or the end follows) is off the clock, as they are. `checking`: apply non_finite_policy."""
        window = [entry for entry in self.pending if entry[0] <= step]
        self.deferred = None if self.deferred is not None and self.deferred <= step else self.deferred
        self.pending = self.pending[len(window):]
        fetched = metrics_lib.fetch([metrics for _, metrics, _, _ in window])
        arrived = time.perf_counter()
        elapsed = max(arrived - self.window_start, 1e-9)
        logs = metrics_lib.reduce_window(fetched)
        logs.update(throughput.window_logs([counts for *_, counts in window], seconds=elapsed,
                                           rows_per_step=self.args.train_batch_size,
                                           process_count=jax.process_count(), peak=flops.hardware_peak))
        logs["epoch"] = step / self.data.steps_per_epoch
        if not self.compile_logged:
            logs["compile_seconds"], self.compile_logged = self.compile_seconds, True
            logs.update(self.memory_plan.logs() if self.memory_plan else {})
            if "mfu" in logs:
                logs["peak_flops"] = flops.hardware_peak().flops_per_second
        self.last_logs = logs
        self.reporter.log(step, logs, split="train")
        self.parts.callbacks.on_log(self.parts.owner, step, logs)
        if checking:  # a background save that failed (a full disk) stops the run here, not at the next save
            self.manager.raise_failed_save()
        self.heap.check(saving=self.manager.is_saving())
        self.window_start = arrived if overlapping else time.perf_counter()
        if checking and self.args.non_finite_policy == "stop":
            self.stop_if_skipped(window, fetched)

    def stop_if_skipped(self, window: list[tuple], fetched: list[dict[str, Any]]) -> None:
        """Under `non_finite_policy='stop'`: if the window skipped an update, checkpoint the current state and raise.

        Non-finite updates were skipped inside the step, so the state in memory is finite; it is saved under its own
        step (after a deferred log, the step dispatched after the window's last), with the matching data position.
        That step's metrics are logged first, as a window of their own: the log ends at the checkpoint. Its `on_log`
        then comes before its `on_step_end`, which never comes: the run stops inside the step before.
        """
        if (found := non_finite.first_skipped(window, fetched)) is None:
            return
        current_step = self.pending[-1][0] if self.pending else window[-1][0]
        if self.pending:
            self.log(current_step, checking=False)
        self.save(current_step, force=True)
        self.manager.wait_until_finished()  # the checkpoint must be complete before the error ends the run
        raise non_finite.stop_error(*found, current_step)

    def evaluate(self, step: int) -> None:
        """Evaluate, report and tell the callbacks; a run with nothing to evaluate (no eval data, no evaluators)
        reports nothing."""
        if not (metrics := self.parts.evaluate()):
            return
        self.last_eval, self.last_eval_step = metrics, step
        self.reporter.log(step, self.last_eval, split="eval")
        self.parts.callbacks.on_evaluate(self.parts.owner, step, self.last_eval)

    def save(self, step: int, force: bool = False) -> None:
        """Start a checkpoint of `step` (once per step). One the manager will not write (a step it holds, or one
        not newer than its latest, left by another run) fails the run: it must never end without its checkpoint."""
        parts = self.parts
        if step == self.last_saved_step:
            return
        saved = self.manager.save(step, state=self.state.checkpointed(), data_state=self.iterator.get_state(),
                                  run_info=parts.run_info(), force=force,
                                  progress=run_end.progress(parts.callbacks, self.last_logs),
                                  metrics=self.last_eval if self.last_eval_step == step else None)
        if not saved:
            raise OutputDirError(
                f"output_dir: the checkpoint of step {step} was not written: {self.manager.directory} already holds "
                f"checkpoints at steps {self.manager.all_steps()}, which this run did not write (another run, or "
                "another process, writes there). Nothing was overwritten; resume into an output_dir of its own.")
        self.heap.saved()
        self.last_saved_step = step
        parts.callbacks.on_save(parts.owner, step, str(self.manager.directory / str(step)))
