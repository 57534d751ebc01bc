"""Checkpointing on Orbax: asynchronous saves, strict and exact resume.

Layout: ``<output_dir>/checkpoints/<step>/`` holds five items:

* ``state`` -- the train-state pytree (params, optimizer state, step, PRNG key).
* ``data_state`` -- JSON position of the data iterator.
* ``run_info`` -- JSON arguments, model config and format version, readable on
  its own so a resume can be validated before any array is loaded.
* ``progress`` -- JSON progress of the trainer's helpers (callback states such as
  early stopping's best value and patience), so they resume where they were, and
  the last train logs, which a run resumed there returns if it trains nothing more;
  also the step it was saved at and the train state's own step (``SAVED_AT``, `easytrain.checkpoint_progress`).
* ``fingerprint`` -- JSON digests of every state array (``easytrain.integrity``),
  checked on restore so damaged files fail loudly instead of loading wrong values.

``run_info`` also records the names of the items saved beside it (``easytrain.checkpoint_items``), so a step
that lost one (with its entry in Orbax's metadata) is refused instead of read as an older checkpoint.

Orbax writes each step into ``<step>.orbax-checkpoint-tmp`` and renames it once
complete, so only finalized directories ever count as checkpoints. Typed PRNG
keys (``jax.random.key``) are stored natively by Orbax as raw key data plus the
key implementation; no conversion is needed on either side.
"""

from __future__ import annotations

import copy
import json
import os
import threading
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, TypeVar

import jax
import orbax.checkpoint as ocp

from easytrain import checkpoint_items, checkpoint_options, integrity, orbax_loops, save_barrier, save_failures
from easytrain.checkpoint_dirs import (CHECKPOINTS_DIRNAME, LATEST_ALIASES, CheckpointNotFoundError, finalized_steps,
                                       is_checkpoint, resolve_checkpoint)
from easytrain.checkpoint_progress import SAVED_AT, recorded_updates, saved_at  # noqa: F401 (importable from here)
from easytrain.checkpoint_read_errors import restore_read_error
from easytrain.checkpoint_signatures import (CheckpointMismatchError, Signature, check_signatures,  # noqa: F401
                                             path_name, tree_signature)
from easytrain.errors import CheckpointWriteError, EasytrainError
from easytrain.retention import best_index, metric_value

_T = TypeVar("_T")

__all__ = ["CHECKPOINTS_DIRNAME", "LATEST_ALIASES", "CheckpointManager", "CheckpointMismatchError",
           "CheckpointNotFoundError", "CheckpointWriteError", "finalized_steps", "resolve_checkpoint"]


def _json_ready(name: str, value: Mapping[str, Any]) -> dict[str, Any]:
    """Copies a JSON dict, failing now rather than inside a background save."""
    try:
        return json.loads(json.dumps(dict(value)))
    except (TypeError, ValueError) as err:
        raise TypeError(f"{name} must be JSON-serializable: {err}") from err


# ----------------------------------------------------------------------------- manager

class CheckpointManager:
    """Saves and restores ``(state, data_state, run_info)`` triples by step.

    Retention keeps the newest ``max_to_keep`` checkpoints for resuming and, when
    ``best_metric`` is set, also the best one by that metric. Restores are strict:
    the stored tree must match ``abstract_state`` leaf by leaf.
    """

    def __init__(
        self,
        directory: str | os.PathLike,
        *,
        max_to_keep: int | None = None,
        async_save: bool = True,
        best_metric: str | None = None,
        greater_is_better: bool = False,
        owner: bool = False,
        read_only: bool = False,
    ):
        """Opens (creating if needed) the checkpoint directory.

        Args:
            directory: Where ``<step>/`` directories live, usually ``output_dir/checkpoints``.
            max_to_keep: Newest checkpoints to keep; None keeps all.
            async_save: Write arrays in a background thread after a short device-to-host copy.
            best_metric: Metric name (as passed to ``save(metrics=...)``) whose best
                checkpoint is kept in addition to the newest ones.
            greater_is_better: Direction of ``best_metric``.
            owner: This is the manager of the run holding the output_dir lock (``run_lock``): it alone removes
                the ``<step>.orbax-checkpoint-tmp`` directories a crashed run left. Any other manager could be
                deleting the save a live run is still writing there.
            read_only: Only read (a resume, a reference model, a branch of a live run): never saves, deletes,
                cleans up or creates anything in ``directory``.
        """
        if max_to_keep is not None and max_to_keep < 1:
            raise ValueError(f"max_to_keep must be None or >= 1, got {max_to_keep}")
        if owner and read_only:
            raise ValueError("a CheckpointManager is either its run's own (owner) or read_only, not both")
        self.directory = Path(directory).absolute()
        self.best_metric = best_metric
        self.greater_is_better = greater_is_better
        self.read_only = read_only
        self._async = async_save and not read_only
        options = checkpoint_options.manager_options(max_to_keep, async_save=self._async, best_metric=best_metric,
                                                     greater_is_better=greater_is_better, owner=owner,
                                                     read_only=read_only)
        handlers = {"state": ocp.StandardCheckpointHandler(), "data_state": ocp.JsonCheckpointHandler(),
                    "run_info": ocp.JsonCheckpointHandler(), "fingerprint": ocp.JsonCheckpointHandler(),
                    "progress": ocp.JsonCheckpointHandler()}
        for handler in handlers.values():  # several processes: a failed write ends the others' wait (`save_barrier`)
            save_barrier.report_write_failures(handler, self._report_write_failure)
        self._writing: int | None = None  # the step of the save last started
        self._read: dict[tuple[str, int], Any] = {}  # what `_once` read of each step
        orbax_loops.end_leftover_tasks()  # a failed read or write: its one error, not dozens of tracebacks
        with checkpoint_options.quiet_read_only_notice():
            self._manager = ocp.CheckpointManager(self.directory, options=options, item_handlers=handlers)
        self._closed, self._owner = False, owner
        self._in_flight: int | None = None  # the step of a background save not yet known to have succeeded
        if not read_only:
            save_failures.quiet_disk_full_reports(True)

    def save(
        self,
        step: int,
        *,
        state: Any,
        data_state: Mapping[str, Any],
        run_info: Mapping[str, Any],
        metrics: Mapping[str, float] | None = None,
        force: bool = False,
        progress: Mapping[str, Any] | None = None,
    ) -> bool:
        """Starts saving a checkpoint; with ``async_save`` it completes in the background.

        Arrays are copied off the device before this returns, so the caller may
        keep updating (or donating) ``state`` right away.

        Args:
            step: Global step; must be newer than every existing step unless ``force``.
            state: Pytree of jax arrays.
            data_state: JSON dict, e.g. the data-iterator position.
            run_info: JSON dict of arguments, model config and format version.
            metrics: Values used to rank checkpoints when ``best_metric`` is set.
            force: Save even if ``step`` is older than the latest checkpoint.
            progress: JSON dict of helper progress, e.g. ``{"callbacks": ...}``; copied now, with the
                ``SAVED_AT`` record of ``step`` and ``state`` added.

        Returns:
            True if a save was started; False if ``step`` is already saved, or is
            not newer than the latest checkpoint and ``force`` is off, or the manager is ``read_only``.
        """
        if self.read_only or step in self._manager.all_steps():  # includes a save still in flight
            return False
        self._read.clear()  # retention may remove steps read before
        progress = {**(progress or {}), SAVED_AT: saved_at(step, state)}
        items = {
            "state": ocp.args.StandardSave(state),
            "data_state": ocp.args.JsonSave(_json_ready("data_state", data_state)),
            "fingerprint": ocp.args.JsonSave(integrity.fingerprint(state, integrity.SMALL_ON_HOST)),
            "progress": ocp.args.JsonSave(_json_ready("progress", progress)),
        }
        recorded = checkpoint_items.with_record(_json_ready("run_info", run_info), [*items, "run_info"])
        args = ocp.args.Composite(**items, run_info=ocp.args.JsonSave(recorded))
        ranked = {name: float(value) for name, value in (metrics or {}).items()} if self.best_metric else None
        if self._in_flight is not None:  # Orbax's save waits for it too: its failure is named as its own step's
            self.wait_until_finished()
        running, self._writing = set(threading.enumerate()), int(step)
        try:
            started = bool(self._manager.save(int(step), args=args, metrics=ranked, force=force))
        except Exception as error:
            if not self._async:
                save_failures.let_writers_end(running)
            if not save_failures.is_write_failure(error):
                raise
            raise self._write_error(int(step), error) from error
        except BaseException:
            if not self._async:
                save_failures.let_writers_end(running)
            raise
        self._in_flight = int(step) if started and self._async else self._in_flight
        return started

    def all_steps(self) -> list[int]:
        """Steps of complete checkpoints on disk, ascending (in-flight saves excluded)."""
        return finalized_steps(self.directory)

    def latest_step(self) -> int | None:
        """Newest complete checkpoint step, or None."""
        steps = self.all_steps()
        return steps[-1] if steps else None

    def best_step(self) -> int | None:
        """Complete checkpoint with the best ``best_metric``; None when not ranking."""
        if self.best_metric is None:
            return None
        steps = self.all_steps()
        values = [metric_value(self._manager.metrics(step), self.best_metric) for step in steps]
        best = best_index(values, self.greater_is_better)
        return None if best is None else steps[best]

    def _once(self, what: str, step: int, read: Callable[[], _T]) -> _T:
        """`read()`, the `what` of `step`, done once per manager until its next save: a resume's checks ask the same
        things of its checkpoint again, each a file read (and on a network filesystem, a round trip). Nothing is kept
        while a background save is in flight: its retention removes steps once it is written, after `save` returned.
        Callers copy what they hand out, so a change of theirs is not what the next read returns."""
        if (what, step) in self._read:
            return self._read[what, step]
        value = read()
        if self._in_flight is None:
            self._read[what, step] = value
        return value

    def _require(self, step: int) -> None:
        """`step` must be a complete checkpoint: its directory alone is looked at; the directory's steps are listed
        only to name them in the refusal."""
        def check() -> None:
            if not is_checkpoint(self.directory / str(step)):
                raise CheckpointNotFoundError(f"no complete checkpoint for step {step} in {self.directory}; "
                                              f"available: {self.all_steps()}")

        self._once("complete", step, check)

    def _run_info(self, step: int) -> Any:
        """The run_info JSON of complete `step` as saved, with its record of items: read once for both."""
        self._require(step)
        return self._once("run_info", step, lambda: checkpoint_items.read_json(self.directory / str(step), "run_info"))

    def read_run_info(self, step: int) -> dict[str, Any]:
        """The ``run_info`` JSON of ``step`` as it was saved (no record of items): cheap, no arrays touched."""
        return copy.deepcopy(checkpoint_items.without_record(self._run_info(step)))

    def check_items(self, step: int) -> frozenset[str] | None:
        """Refuse ``step`` if an item it was saved with is missing (`checkpoint_items.check_items`), naming the
        steps there to resume instead. Reads JSON only.

        Returns:
            The items its run_info records (`checkpoint_items.record_of`); None for a checkpoint written before.

        Raises:
            checkpoint_items.MissingItemError: an item it was saved with is gone; nothing is loaded.
        """
        return self._once("items", step, lambda: self._check_items(step))

    def _check_items(self, step: int) -> frozenset[str] | None:
        self._require(step)
        try:
            run_info = self._run_info(step)
        except FileNotFoundError:  # no checkpoint lacks its directory (`_require`): its file alone is gone, which its
            run_info = None        # reader reports
        step_dir = self.directory / str(step)
        recorded = checkpoint_items.record_of(run_info, step_dir)
        checkpoint_items.check_items(step_dir, recorded, self.all_steps)
        return recorded

    def _present(self, step: int, item: str) -> bool:
        """Whether ``item`` of ``step`` is there to read; False for a checkpoint written before it. One missing now is
        checked again, fresh (the step's completeness too): one gone since the step's first check (a live run's
        retention removing the step, damage) is refused as it was then, not taken for an older checkpoint's."""
        if (self.directory / str(step) / item).is_dir():
            return True
        self._read.pop(("complete", step), None)
        self._check_items(step)
        return False

    def read_data_state(self, step: int) -> dict[str, Any]:
        """Reads only the ``data_state`` JSON of ``step``, so a resume can check it before any array is loaded."""
        self.check_items(step)
        restored = self._manager.restore(step, args=ocp.args.Composite(data_state=ocp.args.JsonRestore()))
        return dict(restored.data_state)

    def read_progress(self, step: int) -> dict[str, Any]:
        """The ``progress`` JSON of ``step``; empty for checkpoints written before it existed (one whose metadata
        was saved with it but lacks it is damaged: `checkpoint_items.MissingItemError`)."""
        self.check_items(step)
        if not self._present(step, "progress"):
            return {}
        restored = self._manager.restore(step, args=ocp.args.Composite(progress=ocp.args.JsonRestore()))
        return dict(restored.progress)

    def read_saved_updates(self, step: int) -> int | None:
        """The train state's step (its optimizer updates) recorded when ``step`` was saved (`recorded_updates`)."""
        return recorded_updates(self.read_progress(step), step)

    def stored_signature(self, step: int) -> Signature:
        """(shape, dtype) per dotted key of the state stored at ``step``, from metadata only (read once)."""
        self._require(step)

        def read() -> Signature:
            metadata = self._manager.item_metadata(step).state
            return tree_signature(getattr(metadata, "tree", metadata))

        return dict(self._once("signature", step, read))

    def restore(self, step: int, *, abstract_state: Any) -> tuple[Any, dict[str, Any], dict[str, Any]]:
        """Restores ``step`` into the structure, shapes and shardings of ``abstract_state`` (`restore_state`), with
        its data position and run_info, both read first: a damaged one is a `CheckpointReadError` before any array.

        Returns:
            ``(state, data_state, run_info)``.
        """
        try:
            data_state, run_info = self.read_data_state(step), self.read_run_info(step)
        except EasytrainError:  # a step that is gone, or lost an item: already said so
            raise
        except checkpoint_items.READ_ERRORS as error:
            raise restore_read_error(self.directory, step, self.all_steps(), error) from error
        return self.restore_state(step, abstract_state=abstract_state), data_state, run_info

    def restore_state(self, step: int, *, abstract_state: Any) -> Any:
        """Restores the state of ``step`` into the structure, shapes and shardings of ``abstract_state``.

        Args:
            step: A step from ``all_steps()``.
            abstract_state: Pytree like the saved state whose leaves are
                ``jax.ShapeDtypeStruct(shape, dtype, sharding=...)`` carrying the
                target shardings (a different mesh than at save time is fine).

        Raises:
            CheckpointNotFoundError: ``step`` is not a complete checkpoint.
            CheckpointMismatchError: keys, shapes or dtypes differ; nothing is loaded.
            checkpoint_items.MissingItemError: an item it was saved with is gone; nothing is loaded.
            integrity.CorruptCheckpointError: restored values differ from the saved fingerprint.
        """
        self.check_items(step)
        check_signatures(self.stored_signature(step), tree_signature(abstract_state))
        items = {"state": ocp.args.StandardRestore(abstract_state)}
        fingerprinted = self._present(step, "fingerprint")
        if fingerprinted:
            items["fingerprint"] = ocp.args.JsonRestore()
        restored = self._manager.restore(step, args=ocp.args.Composite(**items))
        if fingerprinted:
            integrity.verify(restored.state, dict(restored.fingerprint), where=str(self.directory / str(step)))
        return restored.state

    def wait_until_finished(self) -> None:
        """Blocks until background saves (and their cleanup) finish; raises a failed one's error (once), as
        `CheckpointWriteError`."""
        self._wait(self._manager.wait_until_finished)

    def raise_failed_save(self) -> None:
        """Raise (once) the error of a background save that has ended (a write failure as `CheckpointWriteError`,
        anything else as it is); never waits for one still being written. Called at every log step, a failed save (a
        full disk) stops the run there, not at the next save."""
        if not self._manager.is_saving_in_progress():
            self.wait_until_finished()  # returns at once: no save left to wait for

    def _wait(self, wait: Any) -> None:
        """Run Orbax's `wait` (its wait or close), raising the failure of the save in flight as its step's."""
        step, self._in_flight = self._in_flight, None
        try:
            wait()
        except EasytrainError:
            raise
        except Exception as error:
            if not save_failures.is_write_failure(error):
                raise
            raise self._write_error(step, error) from error

    def _write_error(self, step: int | None, error: BaseException) -> CheckpointWriteError:
        """`error` of the save of `step` as the user reads it (`save_failures.write_error`). Its writers are let
        end first; then, in a single-process run that owns the directory, the save's half-written files are removed
        (on a full disk, job.json needs the space; the next start would remove them anyway)."""
        if isinstance(error, CheckpointWriteError):
            return error
        self._report_write_failure(error, step)  # before waiting for the writers: the others wait for this save
        save_failures.let_writers_end()
        alone = self._owner and jax.process_count() == 1  # another process may still be writing its part there
        removed = alone and step is not None and save_failures.remove_partial(self.directory, step)
        return save_failures.write_error(self.directory, step, self.latest_step(), error, removed)

    def _report_write_failure(self, error: BaseException, step: int | None = None) -> None:
        """In a multi-process run, publish a failed write of the save of `step` (None: the one last started) at once,
        from the writer that failed (`save_barrier`): the other processes stop waiting for this save."""
        if jax.process_count() > 1 and save_failures.is_write_failure(error):
            step = self._writing if step is None else step
            save_barrier.publish_failed_write(save_failures.write_error(self.directory, step, self.latest_step(), error,
                                                                        removed_partial=False))

    def is_saving(self) -> bool:
        """Whether a background save is still being written (never blocks)."""
        return self._manager.is_saving_in_progress()

    def close(self) -> None:
        """Waits for pending saves, then releases Orbax resources. Idempotent."""
        if not self._closed:
            self._closed = True
            try:
                self._wait(self._manager.close)
            finally:
                if not self.read_only:
                    save_failures.quiet_disk_full_reports(False)

    def __enter__(self) -> CheckpointManager:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
