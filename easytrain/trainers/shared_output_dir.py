"""Every process of a multi-process run must see the same `output_dir`: each writes its share of every checkpoint
there and process 0 completes it, so a process whose output_dir lies on storage of its own (a worker's local disk
at the same path, or another --output_dir) leaves the save waiting forever for files it cannot see, with no error.

When the trainers are built, before any compute, process 0 writes a token file holding a fresh random nonce into
its output_dir; the processes exchange that nonce (one small gather, which also orders the write before every read,
and carries their arguments' digest: `argument_agreement.telling_differences`), and each reads the token back
from its own output_dir. Who saw it travels in the next gather, beside what the caller gathers then (the start each
process decided, `start_agreement`): no gather of its own. Every process then raises the same
`ArgumentError`, whatever else it gathered (an interrupted one its interrupt), and process 0 removes the token (and,
when the run is refused, by this check or by the caller, the directories it made to hold it, while empty: a refused
run leaves the file system as it found it). A single process, and a run that neither checkpoints nor resumes (each
process then writes nothing there, or only process 0 does), compare nothing.
"""

from __future__ import annotations

import time
import uuid
from pathlib import Path
from typing import Callable, TypeVar

import numpy as np

from easytrain.arguments import TrainingArguments
from easytrain.errors import ArgumentError, OutputDirError

TOKEN_PREFIX = ".easytrain-shared-"
_NONCE_BYTES = 16
_PATH_BYTES = 1024  # of each process's output_dir, shown in the error (longer ones are cut)
_NO_RESUME = frozenset({"false", "none", ""})  # resume_from_checkpoint values that resume nothing
_READ_TRIES = 3  # a token not seen at once is looked for again (a mount may show a new file a little late)

Gather = Callable[[np.ndarray], np.ndarray]
T = TypeVar("T")


def needs_check(args: TrainingArguments) -> bool:
    """Whether every process uses `output_dir`: it checkpoints (all processes write) or resumes (all read)."""
    resume = args.resume_from_checkpoint
    resumes = not (resume is None or resume is False or (isinstance(resume, str) and resume.lower() in _NO_RESUME))
    return args.save_strategy != "no" or resumes


def check_processes_share(output_dir: Path, gather: Gather, *, is_main_process: bool,
                          then: Callable[[Gather], T] = lambda gather: gather(np.zeros(0, np.uint8))) -> T:
    """This process's part of the check, then `then(gather)`, whose first gather carries who saw the token (a
    refusal raised from it on every process alike). `gather` stacks every process's record in process order (a
    collective: every process calls it the same number of times, whatever it finds); by default `then` gathers
    nothing more. A `then` that raises is a refused run too: the directories made for the token are removed."""
    nonce, written, created = _write_token(output_dir) if is_main_process else (b"", None, [])
    record = np.zeros(1 + _NONCE_BYTES + 2 + _PATH_BYTES, dtype=np.uint8)
    record[0] = written is None
    record[1:1 + len(nonce)] = np.frombuffer(nonce, dtype=np.uint8)
    path = str(output_dir.absolute()).encode()[:_PATH_BYTES]
    record[1 + _NONCE_BYTES:3 + _NONCE_BYTES] = np.frombuffer(len(path).to_bytes(2, "little"), dtype=np.uint8)
    record[3 + _NONCE_BYTES:3 + _NONCE_BYTES + len(path)] = np.frombuffer(path, dtype=np.uint8)
    refused = True
    try:
        everyone = np.asarray(gather(record)).reshape(-1, record.size)
        paths = [_path(row) for row in everyone]
        if not everyone[0, 0]:
            raise OutputDirError(f"output_dir: process 0 cannot write to {paths[0]!r}; choose a writable "
                                 "--output_dir on storage every process shares.") from written
        token = everyone[0, 1:1 + _NONCE_BYTES].tobytes()
        result = then(_telling_sight(gather, _sees(output_dir, token), paths))
        refused = False
    finally:  # whatever happens (a peer gone, a signal), process 0's token does not outlive the check
        if is_main_process and written is None:
            _remove(output_dir / _token_name(nonce))
        if refused:  # nor do the directories it made for the token: a refused run leaves the disk as it was
            remove_empty(created)
    return result


def _telling_sight(gather: Gather, saw: bool, paths: list[str]) -> Gather:
    """`gather` with whether this process saw the token put before its record (and taken off every row): where any
    process did not see it, every process raises the same `ArgumentError` instead of returning the rows."""
    def gather_telling(record: np.ndarray) -> np.ndarray:
        record = np.asarray(record)
        rows = np.asarray(gather(np.concatenate([np.array([saw], dtype=record.dtype), record])))
        rows = rows.reshape(-1, record.size + 1)
        if blind := [process for process, row in enumerate(rows) if not row[0]]:
            raise ArgumentError("output_dir", _message(blind, paths))
        return rows[:, 1:]
    return gather_telling


def _token_name(nonce: bytes) -> str:
    return TOKEN_PREFIX + nonce.hex()


def _write_token(output_dir: Path) -> tuple[bytes, OSError | None, list[Path]]:
    """Process 0: a new nonce, why its token could not be written if so (shown as the error's cause), and the
    directories made for it (output_dir and missing parents, deepest first) that a refused run removes again."""
    nonce = uuid.uuid4().bytes
    missing = missing_directories(output_dir)
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
        (output_dir / _token_name(nonce)).write_bytes(nonce)
    except OSError as error:
        return nonce, error, missing
    return nonce, None, missing


def missing_directories(directory: Path) -> list[Path]:
    """`directory` and its ancestors that do not exist yet, deepest first (up to one that cannot be looked at:
    this never raises, so process 0 always reaches the gathers its peers wait in)."""
    missing, path = [], directory.absolute()
    try:
        while not path.exists() and path != path.parent:
            missing.append(path)
            path = path.parent
    except OSError:
        pass
    return missing


def remove_empty(directories: list[Path]) -> None:
    """Remove these directories, deepest first, while they are empty (a file someone put there keeps its own)."""
    for directory in directories:
        try:
            directory.rmdir()
        except FileNotFoundError:
            continue  # never made (mkdir failed above it), or already gone
        except OSError:
            return  # not empty, or not ours to remove: it and its parents stay


def _sees(output_dir: Path, nonce: bytes) -> bool:
    """Whether this process reads process 0's token, nonce and all, in its own output_dir."""
    for attempt in range(_READ_TRIES):
        try:
            if (output_dir / _token_name(nonce)).read_bytes() == nonce:
                return True
        except OSError:
            pass
        if attempt + 1 < _READ_TRIES:
            time.sleep(1.0)
    return False


def _remove(token: Path) -> None:
    try:
        token.unlink(missing_ok=True)
    except OSError:
        pass  # a hidden file left behind is harmless: no check of output_dir looks at it


def _path(row: np.ndarray) -> str:
    length = int.from_bytes(row[1 + _NONCE_BYTES:3 + _NONCE_BYTES].tobytes(), "little")
    return row[3 + _NONCE_BYTES:3 + _NONCE_BYTES + length].tobytes().decode(errors="replace")


def _message(blind: list[int], paths: list[str]) -> str:
    who = f"process {blind[0]}" if len(blind) == 1 else f"processes {', '.join(map(str, blind))}"
    if other := [process for process in blind if paths[process] != paths[0]]:
        given = "; ".join(f"process {process} was given {paths[process]!r}" for process in other)
    else:
        given = f"the same path on {who}, but other storage: a disk of each host's own?"
    return (f"{who} cannot see the files process 0 writes in its output_dir {paths[0]!r} ({given}). Every process "
            "writes its share of each checkpoint into output_dir and process 0 completes it, so the run would hang "
            "at its first save. Put output_dir on storage every process shares (an NFS or Filestore mount, or a GCS "
            "bucket mounted with gcsfuse, at the same path on every host) and pass the same --output_dir to every "
            "process.")
