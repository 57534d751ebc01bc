"""What the claim of an output_dir takes from the older run there, held until the new run's first step is done.

`claim.claim_output_dir` removes an overwritten run (`overwrite_output_dir`) and sets aside the checkpoints a
resume of an older step abandons. A run can still fail after that and before its first step: the step may not fit
the device (`DeviceMemoryError`: a batch too large, bad input), the loss may fail to trace or compile, a stop signal
may come while it compiles. None of those may cost the older run. So the claim only moves: what it removes goes to
`output_dir/replaced_run/<time>/`, what it sets aside to `superseded_checkpoints/<time>/` as always, every move
recorded (`HeldRun`), and the logs a resumed run rewrites (it drops their records past its step) are copied first, as
are those behind a link that a run started over empties (`empty_through_link`).
`undo` (the run ended before its first step was done, or the claim failed midway) puts everything back as it was,
byte for byte: the trackers' records too (`tracker_records`, read before they open), and none of the run's outputs
the older run lacked (`note_absent`); `settle` (the first step is done, or the run ended without one as asked)
deletes `replaced_run/`. A process ended by the failure watcher undoes first (`process_failure.before_ending`); one
killed in between leaves the older run in `replaced_run/`, whole: moved back by hand, or removed by the next claim
under `overwrite_output_dir` once its first step is done. A deletion at `settle` the file system refuses is a warning,
never the healthy run's failure: what is left, renamed `<time>.deleting` first, goes at the next claim's `settle`.
Links are moved and removed as links, never followed (`run_dir.remove`); a relative one moved is made again,
absolute, so it leads where it did from its new place and once moved back by hand (`_relinked`); `undo` gives it its
own text again. A log copied through its link (`copy`) is put back through it.

Compiling ahead before the claim instead would cover only what `plan_memory` compiles: a `train_iteration` of a
subclass compiles its own steps at the first call, after the claim, and a runtime failure of the first step would
still cost the older run; holding covers whatever ends the run before its first step.
"""

from __future__ import annotations

import dataclasses
import errno
import logging
import os
import shutil
import threading
import time
from pathlib import Path

from easytrain.job_records import JOB_FILENAME, keep_older_run_data, read_record
from easytrain.jobs import Job, current_job
from easytrain.linked_logs import own_event_file, run_entry
from easytrain.reporting import CSV_FILENAME, METRICS_FILENAME
from easytrain.sinks import MLFLOW_STATE_FILENAME, WANDB_STATE_FILENAME, replace_through_link
from easytrain.trainers.run_dir import REPLACED_DIRNAME, present, remove as _delete

logger = logging.getLogger("easytrain")

#: The records of the run the metric trackers log into, written as they open, before the claim (`run_start`).
TRACKER_RECORDS = (WANDB_STATE_FILENAME, MLFLOW_STATE_FILENAME)
#: Where W&B writes its runs, offline ones included (`sinks`), as it opens: a record of a kind too.
WANDB_DIRNAME = "wandb"


@dataclasses.dataclass
class HeldRun:
    """The moves and copies one claim of `output_dir` made (main process; empty elsewhere)."""

    output_dir: Path
    moves: list[tuple[Path, Path]] = dataclasses.field(default_factory=list)  # (from, to), in the order made
    copies: list[tuple[Path, Path]] = dataclasses.field(default_factory=list)  # (original, its copy)
    listings: dict[Path, set[str]] = dataclasses.field(default_factory=dict)  # a directory -> its entries then
    made: list[Path] = dataclasses.field(default_factory=list)  # directories the moves created
    leftovers: list[Path] = dataclasses.field(default_factory=list)  # a killed run's held runs, removed at `settle`
    absent: list[Path] = dataclasses.field(default_factory=list)  # run outputs the older run lacked: gone at `undo`
    records: dict[Path, bytes | None] = dataclasses.field(default_factory=dict)  # `tracker_records` before they open
    link_texts: dict[Path, str] = dataclasses.field(default_factory=dict)  # a link moved -> its text then
    copied_links: dict[Path, str] = dataclasses.field(default_factory=dict)  # a link whose target was copied -> text
    holding: Path | None = None
    #: `undo` may come from the failure watcher's thread (`process_failure.before_ending`) while the run settles.
    lock: threading.Lock = dataclasses.field(default_factory=threading.Lock, repr=False, compare=False)

    def __bool__(self) -> bool:
        """Whether anything is held: a run with nothing to give back needs no `settle`."""
        return bool(self.moves or self.copies or self.leftovers)

    def move(self, source: Path, destination: Path) -> Path:
        """Move `source` to `destination` (a new path), recorded so that `undo` moves it back. Across file systems
        (through a checkpoints/ linked to a scratch disk) it is a copy, then the source is deleted (`_move`)."""
        if source.is_symlink():
            self.link_texts[source] = os.readlink(source)  # `undo` puts back this text, not the one made for its place
        _move(source, destination)
        self.moves.append((source, destination))
        return destination

    def remove(self, target: Path) -> None:
        """What the claim would delete: moved into this claim's `replaced_run/<time>/`, deleted at `settle`."""
        if present(target):  # a link too, even a dangling one: moved itself, never what it points to
            self.move(target, self._holding() / target.relative_to(self.output_dir))

    def copy(self, target: Path) -> None:
        """A file the run rewrites in place (a log it truncates): copied, put back by `undo`. Through a link (logs
        kept on another disk) it is what the link leads to that is copied, and put back, the link kept as it was
        (a log truncates through it: `sinks.replace_through_link`); a dangling one is copied as the link."""
        if any(original == target for original, _ in self.copies):
            return  # copied once: the first copy is what the claim found
        if target.is_file() or target.is_symlink():
            through = target.is_symlink() and target.is_file()
            copied = shutil.copy2(target, self._holding() / f"{target.name}.before", follow_symlinks=through)
            self.copies.append((target, Path(copied)))
            if through:
                self.copied_links[target] = os.readlink(target)

    def empty_through_link(self, link: Path) -> None:
        """A log behind a link (kept on another disk) that the run starts anew: the link stays, what it leads to is
        emptied, its content held (`copy` for a file; a directory's entries moved into this claim's `replaced_run/`),
        put back by `undo`, deleted at `settle`. Of a directory, only what a run writes there goes
        (`linked_logs.run_entry`): another's folder in a TensorBoard root the link leads to stays."""
        if not link.is_dir():
            self.copy(link)
            replace_through_link(link, b"")
            return
        if entries := sorted(entry for entry in link.iterdir() if run_entry(entry.name)):
            holding = self._holding() / link.name
            holding.mkdir()
            self.made.append(holding)
            for entry in entries:
                self.move(entry, holding / entry.name)

    def list_entries(self, directory: Path) -> None:
        """A directory the run adds files to (TensorBoard's events): `undo` removes the entries added since; through
        a link (a folder others may write to), only the event file this process added (`linked_logs.own_event_file`)."""
        if directory.is_dir():
            self.listings[directory] = {p.name for p in directory.iterdir()}

    def note_absent(self, paths: list[Path]) -> None:
        """Of the files and directories a run writes (its logs, checkpoints, arguments), those the older run lacks:
        what the failed run wrote there (a CSV log the older one did not keep) is removed by `undo`."""
        self.absent = [path for path in paths if not present(path)]

    def new_directory(self, path: Path) -> Path:
        """`path`, or `path-2`, `path-3`, ... if it exists (two claims in one second never merge), created and
        recorded (with its missing parents) so that `undo` removes it once emptied."""
        candidate, n = path, 1
        while candidate.exists():
            n += 1
            candidate = path.with_name(f"{path.name}-{n}")
        self.made += [p for p in (*reversed(candidate.parents), candidate) if not p.exists()]
        candidate.mkdir(parents=True)
        return candidate

    def _holding(self) -> Path:
        if self.holding is None:
            self.holding = self.new_directory(self.output_dir / REPLACED_DIRNAME / time.strftime("%Y%m%d-%H%M%S"))
        return self.holding

    def settle(self) -> None:
        """The run's first step is done: delete what the claim removed (and what earlier claims held, where this one
        overwrites or they were being deleted: `leftover_kind`); what it set aside stays in `superseded_checkpoints/`.
        A link the claim moved is removed itself, never what it points to (named in the log). A deletion that fails
        (permissions) is a warning naming what is left: the run that replaced the older one goes on."""
        with self.lock:
            removed = [held for held in (self.holding, *self.leftovers) if held is not None]
            links = [(source, moved) for source, moved in self.moves
                     if moved.is_symlink() and self.holding is not None and self.holding in moved.parents]
            self._forget()  # first: nothing is left to move back
        for source, link in links:
            logger.warning("%s was a link to %s: the link is removed with the older run, what it points to is left "
                           "as it was (delete it there if it is no longer needed)", source, _link_target(link))
        for held in removed:
            _delete_held(held)
        _remove_if_empty(self.output_dir / REPLACED_DIRNAME)

    def _forget(self) -> None:
        self.moves, self.copies, self.listings, self.made, self.leftovers, self.holding = [], [], {}, [], [], None
        self.absent, self.records, self.link_texts, self.copied_links = [], {}, {}, {}

    def undo(self) -> None:
        """The run ended before its first step was done: put the older run back as the claim found it. What the run
        wrote in its place (logs with no step in them, an empty checkpoints/) goes; its job.json, which records
        how it ended, stays, keeping the older run's data for a resume of it (`job_records.OLDER_RUN_DATA`)."""
        with self.lock:
            self._undo()

    def give_back(self) -> None:
        """`undo` for a run ending with an error of its own, which is the one to raise: a failure to put the older
        run back is logged, naming where what is left of it lies."""
        try:
            self.undo()
        except Exception:
            logger.exception("could not put the older run in %s back as it was: what is left of it lies in %s and "
                             "superseded_checkpoints/", self.output_dir, self.holding)

    def _undo(self) -> None:
        running = current_job()  # a job opened around train() (the command's) that records the failure next
        if running is not None and running.output_dir.resolve() != self.output_dir.resolve():
            running = None
        if self and running is not None:
            running.keep_older_run()
        for original, copied in reversed(self.copies):
            if original in self.copied_links:
                _restore_link(original, self.copied_links[original])
                replace_through_link(original, copied.read_bytes())
                copied.unlink()
            else:
                copied.replace(original)
        for added in self.absent:
            _delete(added)
        for record, content in self.records.items():  # the older run's trackers: a resume of it logs into them
            if content is not None:
                record.write_bytes(content)
                continue
            try:
                _delete(record)
            except OSError as error:  # W&B may still write into wandb/: the older run goes back all the same
                logger.warning("could not remove %s, which the failed run made (%s); delete it by hand", record, error)
        for directory, entries in self.listings.items():
            ours = own_event_file if directory.is_symlink() else lambda name: True
            for added in [p for p in directory.iterdir() if p.name not in entries and ours(p.name)] \
                    if directory.is_dir() else []:
                _delete(added)
        for source, moved in reversed(self.moves):
            if present(source):
                if source.name == JOB_FILENAME and source.parent == self.output_dir:  # the failed run's record
                    self._keep_failed_record(source, moved, running)
                    continue
                _delete(source)
            source.parent.mkdir(parents=True, exist_ok=True)
            _move(moved, source, link_text=self.link_texts.get(source))
        for directory in reversed(self.made):
            _remove_if_empty(directory)
        if self:
            logger.warning("%s: the run ended before its first step was done, so the older run there is as it was "
                           "(nothing removed or set aside)", self.output_dir)
        self._forget()


    def _keep_failed_record(self, record: Path, moved: Path, running: Job | None) -> None:
        """`record`, the failed run's job.json, stays and keeps the data of the older one (`moved` aside by the claim),
        given to `running` where that job is still to record how it ended. Where the older one was a link, the link
        goes back, the failed run's record written through it, as into a plain job.json."""
        if running is not None:
            running.keep_older_run(read_record(moved))
        else:
            keep_older_run_data(self.output_dir, read_record(moved))
        if not moved.is_symlink():
            _delete(moved)
            return
        failed = record.read_bytes()
        _delete(record)
        _move(moved, record, link_text=self.link_texts.get(record))
        replace_through_link(record, failed)


def tracker_records(output_dir: Path) -> dict[Path, bytes | None]:
    """The trackers' records in `output_dir` (`TRACKER_RECORDS`; None: none there), read before the trackers open:
    a fresh run's replace them, and `undo` puts them back (`HeldRun.records`); a dangling link there (refused where
    the run writes it: `run_dir.check_links`) is no record of the run, and stays. So is the absence of a `wandb/`
    folder (the failed run's offline run is removed); one the older run kept is left as the failed run left it."""
    paths = [output_dir / name for name in TRACKER_RECORDS]
    records = {path: path.read_bytes() if path.is_file() else None for path in paths
               if path.exists() or not path.is_symlink()}
    if not present(output_dir / WANDB_DIRNAME):  # the older run kept none: `undo` removes the failed run's
        records[output_dir / WANDB_DIRNAME] = None
    return records


def held_leftovers(output_dir: Path) -> list[Path]:
    """What earlier claims left in `replaced_run/` (`leftover_kind` tells what each is)."""
    root = output_dir / REPLACED_DIRNAME
    return sorted(root.iterdir()) if root.is_dir() else []


#: The logs a resumed run rewrites from the step it resumes: `claim_output_dir` holds copies of them.
REWRITTEN_LOGS = (METRICS_FILENAME, CSV_FILENAME)
#: The kinds of leftover in `replaced_run/` (`leftover_kind`), each with what it is and what to do with it.
LEFTOVER_KINDS = {
    "older run": "older runs whose replacing run was stopped before its first step was done, whole: move them back "
                 "to continue them, or delete them",
    "log copies": "copies (*.before) of the logs a resume of an older step had kept before rewriting them, stopped "
                  "before its first step was done: those logs' records past the step it resumed, of the lineage it "
                  "set aside in superseded_checkpoints/; to continue that lineage, move its checkpoints back and copy "
                  "these over the logs (without .before), else delete them",
    "file copies": "copies (*.before) of an older run's files (arguments.json, sft_data_stats.json) that a run not "
                   "continuing its checkpoints (a fresh run, or one resumed from a checkpoint elsewhere) replaced as "
                   "it started, stopped before its first step was done: to keep the older run's, copy them over "
                   "those files (without .before), else delete them",
    "deleting": "what is left of older runs that their replacing run failed to delete after its first step: "
                "delete them (they are deleted once this run's first step is done)",
}


def leftover_kind(path: Path) -> str:
    """Which of `LEFTOVER_KINDS` one entry of `replaced_run/` is: a held run `settle` began to delete (renamed with
    `DELETING_SUFFIX`), one holding only `*.before` copies (`HeldRun.copy`): of a resume's logs, or of the files a
    fresh run replaced as it started where none is a log; or an older run."""
    if path.name.endswith(DELETING_SUFFIX):
        return "deleting"
    try:  # the copies lie at its top; one this user cannot list (another's) is taken for an older run
        entries = list(path.iterdir()) if path.is_dir() and not path.is_symlink() else []
    except OSError:
        entries = []
    if not entries or not all(p.is_file() and p.name.endswith(".before") for p in entries):
        return "older run"
    return "log copies" if any(p.name.removesuffix(".before") in REWRITTEN_LOGS for p in entries) else "file copies"


#: What `settle` renames a held run to before deleting it: what a deletion refused or killed midway leaves is never
#: taken for an older run, whole (`leftover_kind`).
DELETING_SUFFIX = ".deleting"


def _delete_held(held: Path) -> None:
    """Delete what a claim held, renamed first (`DELETING_SUFFIX`); a failure is logged, naming what is left."""
    doomed = held
    try:
        if present(held) and not held.name.endswith(DELETING_SUFFIX):
            doomed = held.rename(_deleting_name(held))
        _delete(doomed)
    except OSError as error:
        logger.warning("could not delete %s (%s: %s), what the claim of output_dir held of the older run there; the "
                       "run goes on. Delete it by hand (see its permissions), or leave it: the next run claiming this "
                       "output_dir deletes it once its first step is done", doomed, type(error).__name__, error)


def _deleting_name(held: Path) -> Path:
    """`held` with `DELETING_SUFFIX`, at a name no leftover has: a claim in the same second as one whose deletion
    failed is named alike, and a rename onto that leftover would fail (or merge into it)."""
    candidate, n = held.with_name(held.name + DELETING_SUFFIX), 1
    while present(candidate):
        n += 1
        candidate = held.with_name(f"{held.name}-{n}{DELETING_SUFFIX}")
    return candidate


def _move(source: Path, destination: Path, link_text: str | None = None) -> None:
    """`shutil.move` to a new path, except that a copy across file systems that fails midway (that disk full) leaves
    no part of it beside the whole source; a deletion of the source that fails leaves the whole copy, as it did. A
    link keeps leading where it did: a relative one is made again, absolute (`_relinked`; `link_text`, where given:
    the text it is to have there)."""
    if source.is_symlink():
        text = link_text if link_text is not None else _relinked(source)
        if text != os.readlink(source):
            os.symlink(text, destination)
            _delete(source)
            return
    try:
        os.rename(source, destination)
        return
    except OSError:
        pass  # as `shutil.move`: another file system, or one that cannot rename directories
    if present(destination):
        raise FileExistsError(errno.EEXIST, "cannot move onto it", str(destination))
    try:
        if source.is_symlink():
            os.symlink(os.readlink(source), destination)
        elif source.is_dir():
            shutil.copytree(source, destination, symlinks=True)
        else:
            shutil.copy2(source, destination)
    except BaseException:
        _delete(destination)
        raise
    _delete(source)


def _relinked(source: Path) -> str:
    """The text of the link `source` once moved: an absolute one as it is, a relative one made absolute (through the
    real directories: `..` in a link climbs out of the real one). It leads to its target from its new place, and from
    output_dir again once moved back by hand (a killed run's held files, a lineage set aside); `undo` puts its own
    text back."""
    text = os.readlink(source)
    return text if os.path.isabs(text) else os.path.normpath(os.path.join(os.path.realpath(source.parent), text))


def _link_target(link: Path) -> str:
    """Where `link` points (moved, where it pointed from its first place: `_relinked`)."""
    return os.path.normpath(os.path.join(os.path.realpath(link.parent), os.readlink(link)))


def _restore_link(path: Path, text: str) -> None:
    """`path` a link with `text` again, where the run replaced it (with a plain file) or left it otherwise."""
    if path.is_symlink() and os.readlink(path) == text:
        return
    _delete(path)
    os.symlink(text, path)


def _remove_if_empty(directory: Path) -> None:
    if directory.is_dir() and not any(directory.iterdir()):
        directory.rmdir()
