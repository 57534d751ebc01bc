"""Metric sinks beyond the console, TensorBoard and JSONL: a CSV file, Weights & Biases and MLflow.

Each sink takes the explicit global step and keeps one record per step across restarts:

* CSV is rewritten like JSONL: on resume, rows after the restored step are dropped.
* W&B and MLflow histories are append-only (neither can delete points); a resumed run reopens the
  same run. MLflow: steps the store already holds are not sent again. W&B: every step after the
  restored one is sent, and W&B keeps one value per step itself (it ignores a step lower than the
  last it stored), because only W&B knows what it stored: a SIGKILL loses the records it had not
  flushed yet. easytrain resumes exactly (same data, same RNG), so a kept value is the one the
  resumed run would have logged.

W&B and MLflow are optional installs (`pip install 'easytrain[wandb]'`, `'easytrain[mlflow]'`),
imported only when `report_to` names them, and checked before any compute.
"""

from __future__ import annotations

import csv
import errno
import importlib.util
import io
import json
import logging
import math
import os
import threading
import time
import uuid
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

from easytrain.errors import ArgumentError
from easytrain.linked_logs import WrittenLog, opened

__all__ = [
    "CSV_FILENAME", "MLFLOW_STATE_FILENAME", "OPTIONAL_SINKS", "REPORT_TO_CHOICES", "WANDB_STATE_FILENAME",
    "CsvSink", "MlflowSink", "RunStatus", "WandbSink", "check_report_to", "copy_json", "json_scalars", "metric_tag",
    "replace_through_link", "strict_json", "write_json_atomically",
]

logger = logging.getLogger("easytrain")

RunStatus = Literal["completed", "failed", "stopped"]
REPORT_TO_CHOICES = ("tensorboard", "jsonl", "csv", "wandb", "mlflow", "none")
#: report_to value -> (module it imports, pip extra that installs it)
OPTIONAL_SINKS = {"wandb": ("wandb", "wandb"), "mlflow": ("mlflow", "mlflow")}
CSV_FILENAME = "metrics.csv"
WANDB_STATE_FILENAME = "wandb_run.json"
MLFLOW_STATE_FILENAME = "mlflow_run.json"
_CSV_FIXED = ("step", "split", "time")


def check_report_to(values: Sequence[str]) -> frozenset[str]:
    """The sinks to open, after checking names and optional packages (before any compute).

    Raises:
        ArgumentError: an unknown name, "none" with a sink, or a sink whose package is not installed.
    """
    unknown = [value for value in values if value not in REPORT_TO_CHOICES]
    if unknown:
        raise ArgumentError("report_to", f"unknown sink(s) {unknown}; allowed: {list(REPORT_TO_CHOICES)}")
    if "none" in values and len(set(values)) > 1:
        raise ArgumentError("report_to", f"{list(values)} combines 'none' with other sinks; use one or the other")
    for value in values:
        if value in OPTIONAL_SINKS:
            module, extra = OPTIONAL_SINKS[value]
            if importlib.util.find_spec(module) is None:
                raise ArgumentError("report_to", f"'{value}' needs the {module} package, which is not installed: "
                                                 f"pip install 'easytrain[{extra}]' (or drop '{value}' from report_to)")
    return frozenset(values) - {"none"}


def metric_tag(split: str, name: str) -> str:
    """``split/name``, dropping a redundant ``split_`` prefix (``eval/eval_loss`` -> ``eval/loss``)."""
    return f"{split}/{name.removeprefix(f'{split}_')}"


def strict_json(value: Any) -> Any:
    """`value` with every non-finite float as the string "nan", "inf" or "-inf": JSON has no NaN or Infinity, and
    strict readers (browsers, jq, most languages) refuse the bare words Python writes. Used by every JSON file."""
    if isinstance(value, float):
        return value if math.isfinite(value) else str(value)
    if isinstance(value, Mapping):
        return {key: strict_json(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [strict_json(item) for item in value]
    return value


def json_scalars(values: Mapping[str, Any]) -> dict[str, Any]:
    """Metrics as JSON holds them: numbers (Python, numpy, 0-d jax scalars) as floats, NaN and infinities as strings;
    None, strings, booleans and ints as they are; nested mappings alike."""
    def scalar(value: Any) -> Any:
        if isinstance(value, Mapping):
            return json_scalars(value)
        return value if value is None or isinstance(value, (str, bool, int)) else strict_json(float(value))

    return {str(key): scalar(value) for key, value in values.items()}


def copy_json(value: Any) -> Any:
    """A copy of JSON-shaped data (a job record): new dicts, lists and tuples, the same immutable scalars. What
    `copy.deepcopy` gives here, in 40% of its time: a trainer hands the record to its callbacks every step."""
    if isinstance(value, dict):
        return {key: copy_json(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(copy_json(item) for item in value)
    return value


def write_json_atomically(path: Path, value: Any) -> None:
    """Write a temporary file then rename it over ``path`` (through a link, over the file it leads to:
    `replace_through_link`): a reader (or a kill) never sees half a file."""
    replace_through_link(path, (json.dumps(strict_json(value), indent=2, allow_nan=False) + "\n").encode("utf-8"))


def replace_through_link(path: Path, content: bytes) -> None:
    """Replace the file `path` leads to with `content`, atomically (a temporary file beside it, then `os.replace`,
    which stays on its disk): where `path` is a link (a log kept on another disk), its target is replaced and the
    link kept, so that what is written next reaches the same file, not a plain one left in `path`'s place."""
    real = Path(os.path.realpath(path))
    if not real.parent.is_dir():  # a dangling link into a directory that is gone: name the link, not the temporary
        raise FileNotFoundError(errno.ENOENT, f"{path} links to {os.readlink(path)!r}, whose directory does not "
                                "exist (a disk not mounted?)", str(path))
    tmp = real.with_name(f".{real.name}.{os.getpid()}.{threading.get_ident()}.tmp")  # a thread's own (the watcher's)
    try:
        tmp.write_bytes(content)
        os.replace(tmp, real)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


# ----------------------------------------------------------------------------- CSV


def _csv_line(values: Iterable[Any]) -> str:
    buffer = io.StringIO()
    csv.writer(buffer, lineterminator="\n").writerow(values)
    return buffer.getvalue()


def _read_csv(path: Path) -> tuple[list[str], list[dict[str, str]], bool]:
    """Header, complete rows (a torn last line from a kill mid-write is left out) and whether one was."""
    if not path.exists():
        return [], [], False
    text = path.read_text(encoding="utf-8")
    torn = bool(text) and not text.endswith("\n")
    lines = text.splitlines(keepends=True)[: -1 if torn else None]
    rows = list(csv.reader(lines))
    if not rows:
        return [], [], torn
    header = rows[0]
    complete = [dict(zip(header, row)) for row in rows[1:] if len(row) == len(header)]
    return header, complete, torn or len(complete) != len(rows) - 1


def _row_step(row: Mapping[str, str]) -> int | None:
    try:
        return int(row["step"])
    except (KeyError, TypeError, ValueError):
        return None


class CsvSink:
    """One row per ``log`` call in ``metrics.csv``: ``step, split, time``, then every metric seen so far.

    A metric that appears later (the first eval, ``compile_seconds``) adds a column: the file is then
    rewritten atomically with the wider header, which happens a handful of times per run.
    """

    def __init__(self, path: Path, initial_step: int):
        self._path = path
        #: What it wrote, counted from an empty file (None: it found rows there): `linked_logs.take_back`.
        self.written: WrittenLog | None = opened(path) if not path.exists() or not path.stat().st_size else None
        header, rows, damaged = _read_csv(path)
        self._columns = header or list(_CSV_FIXED)
        kept = rows if initial_step <= 0 else [
            row for row in rows if (step := _row_step(row)) is not None and step <= initial_step]
        if damaged or not header or len(kept) != len(rows):  # a new file, or one a kill tore (its header too)
            self._rewrite(kept)
        self._file = path.open("a", encoding="utf-8")

    def _rewrite(self, rows: Sequence[Mapping[str, str]]) -> None:
        """The whole file at once, atomically; through a link (logs kept on another disk), the file it leads to."""
        lines = [_csv_line(self._columns)] + [_csv_line(row.get(c, "") for c in self._columns) for row in rows]
        content = "".join(lines).encode("utf-8")
        replace_through_link(self._path, content)
        if self.written is not None:
            self.written.size = len(content)

    def write(self, step: int, split: str, metrics: Mapping[str, float]) -> None:
        row = {"step": str(step), "split": split, "time": repr(time.time()), **{k: repr(v) for k, v in metrics.items()}}
        new = [name for name in row if name not in self._columns]
        if new:
            self._file.close()
            _, rows, _ = _read_csv(self._path)
            self._columns += new
            self._rewrite(rows)
            self._file = self._path.open("a", encoding="utf-8")
        line = _csv_line(row.get(column, "") for column in self._columns)
        self._file.write(line)
        self._file.flush()
        if self.written is not None:
            self.written.size += len(line.encode("utf-8"))

    def close(self, status: RunStatus = "completed") -> None:
        self._file.close()


# ----------------------------------------------------------------------------- trackers


class WandbSink:
    """Scalars under ``split/name`` at ``step=global step`` in a Weights & Biases run.

    The run id is kept in ``output_dir/wandb_run.json``; a resumed run reopens that run
    (``resume="allow"``, recorded in offline runs too, so ``wandb sync`` appends to it). W&B files go
    to ``output_dir/wandb``. A start that fails leaves the record it found as it was (the trackers open before the
    claim of output_dir, so no undo would put an older run's back). Set ``WANDB_PROJECT``, ``WANDB_ENTITY``,
    ``WANDB_MODE=offline`` and others as W&B documents.
    """

    def __init__(self, output_dir: Path, initial_step: int, run_config: Mapping[str, Any] | None):
        import wandb

        state_path = output_dir / WANDB_STATE_FILENAME
        found = state_path.read_bytes() if state_path.is_file() else None  # put back if W&B cannot start
        previous = _read_json(state_path) if initial_step > 0 else None
        run_id = previous["run_id"] if previous else uuid.uuid4().hex[:12]  # W&B ids: lowercase letters, digits
        write_json_atomically(state_path, {"run_id": run_id})  # before any step: a run killed early keeps its id
        try:
            self._run = wandb.init(id=run_id, resume="allow", dir=str(output_dir), config=dict(run_config or {}),
                                   project=os.environ.get("WANDB_PROJECT", "easytrain"),
                                   name=os.environ.get("WANDB_NAME", output_dir.resolve().name))
        except Exception as error:  # not logged in, a bad entity or project: wandb's own message says which
            if found is None:
                state_path.unlink(missing_ok=True)
            else:  # an older run's record (kept on another disk through a link, maybe), as it was
                replace_through_link(state_path, found)
            raise ArgumentError("report_to", f"W&B could not start a run ({type(error).__name__}: {error}). Log in "
                                "(`wandb login`, or WANDB_API_KEY), run offline with WANDB_MODE=offline, or leave "
                                "wandb out of --report_to.") from error

    def write(self, step: int, split: str, metrics: Mapping[str, float]) -> None:
        self._run.log({metric_tag(split, name): value for name, value in metrics.items()}, step=step)

    def close(self, status: RunStatus = "completed") -> None:
        self._run.finish(exit_code=1 if status == "failed" else 0)


_MLFLOW_STATUS = {"completed": "FINISHED", "stopped": "KILLED", "failed": "FAILED"}
_MLFLOW_BATCH = 100  # params per log_batch call accepted by every MLflow backend


class MlflowSink:
    """Metrics under ``split/name`` with ``step=global step`` in an MLflow run; arguments as its params.

    The tracking URI is MLflow's own (``MLFLOW_TRACKING_URI``), the experiment ``MLFLOW_EXPERIMENT_NAME``
    (default "easytrain"). The run id and URI are kept in ``output_dir/mlflow_run.json``; a resumed run
    reopens that run, marks it RUNNING again, and sends each metric only at steps after the last one the
    store holds for it (MLflow would otherwise keep two values at a step; it cannot delete one).
    """

    def __init__(self, output_dir: Path, initial_step: int, run_config: Mapping[str, Any] | None):
        self._state_path = output_dir / MLFLOW_STATE_FILENAME
        previous = _read_json(self._state_path) if initial_step > 0 else None
        try:
            self._open(previous, initial_step, output_dir, run_config)
        except Exception as error:  # an unreachable server, a store this installation cannot use
            uri = previous["tracking_uri"] if previous else os.environ.get("MLFLOW_TRACKING_URI", "mlflow's default")
            raise ArgumentError("report_to", f"MLflow could not start a run at {uri!r} ({type(error).__name__}: "
                                f"{str(error).strip()[:300]}). Set MLFLOW_TRACKING_URI to a store it can use "
                                "(a server, or file:///path with MLFLOW_ALLOW_FILE_STORE=true), or leave mlflow "
                                "out of --report_to.") from error
        write_json_atomically(self._state_path, {"run_id": self._run_id, "tracking_uri": self._client.tracking_uri})

    def _open(self, previous: dict | None, initial_step: int, output_dir: Path,
              run_config: Mapping[str, Any] | None) -> None:
        """Reopen the interrupted run (`previous`) or start one; sets the client, run id and logged-step floors."""
        from mlflow.tracking import MlflowClient

        if previous:
            self._client = MlflowClient(tracking_uri=previous["tracking_uri"])
            self._run_id = previous["run_id"]
            self._client.update_run(self._run_id, status="RUNNING")
            self._floors = self._last_logged_steps()
            held = max(self._floors.values(), default=-1)
            if held > initial_step:
                logger.warning("MLflow run %s already holds steps %d..%d from the interrupted run (some metrics "
                               "of the last may be missing); only what it lacks is logged again (an exact resume "
                               "computes the same values)", self._run_id, initial_step + 1, held)
        else:
            self._client = MlflowClient()
            name = os.environ.get("MLFLOW_EXPERIMENT_NAME", "easytrain")
            experiment = self._client.get_experiment_by_name(name)
            experiment_id = experiment.experiment_id if experiment else self._client.create_experiment(name)
            self._run_id = self._client.create_run(experiment_id, run_name=output_dir.resolve().name).info.run_id
            self._log_params(run_config or {})
            self._floors = {}  # a fresh run logs every step, 0 (an evaluation before training) included

    def _last_logged_steps(self) -> dict[str, int]:
        """The highest step each metric holds, read from the tracking store, not remembered.

        Per metric, because a file store writes a batch one metric at a time: a run killed mid-batch
        leaves a step that some metrics hold and others lack.
        """
        names = self._client.get_run(self._run_id).data.metrics
        return {name: max((m.step for m in self._client.get_metric_history(self._run_id, name)), default=-1)
                for name in names}

    def _log_params(self, config: Mapping[str, Any]) -> None:
        from mlflow.entities import Param

        params = [Param(str(key), str(value)[:500]) for key, value in config.items()]
        for start in range(0, len(params), _MLFLOW_BATCH):
            self._client.log_batch(self._run_id, params=params[start:start + _MLFLOW_BATCH])

    def write(self, step: int, split: str, metrics: Mapping[str, float]) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        tagged = {metric_tag(split, name): value for name, value in metrics.items()}
        values = [Metric(tag, value, now, step) for tag, value in tagged.items() if step > self._floors.get(tag, -1)]
        if values:
            self._client.log_batch(self._run_id, metrics=values)

    def close(self, status: RunStatus = "completed") -> None:
        self._client.set_terminated(self._run_id, _MLFLOW_STATUS[status])
