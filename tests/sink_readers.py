"""Read back what the CSV, W&B and MLflow sinks wrote, with W&B offline and MLflow on a local file store."""

from __future__ import annotations

import csv
import json
import struct
import time
from pathlib import Path

_WANDB_BLOCK = 32768  # the .wandb transaction log is a LevelDB-style log: 32 KiB blocks of framed records


def tracker_env(root: Path) -> dict[str, str]:
    """Environment that keeps W&B offline and MLflow on a file store under `root`: nothing leaves the machine."""
    home = root / "tracker_home"
    return {"WANDB_MODE": "offline", "WANDB_SILENT": "true", "WANDB_CONSOLE": "off", "WANDB_DISABLE_GIT": "true",
            "WANDB_CONFIG_DIR": str(home / "config"), "WANDB_CACHE_DIR": str(home / "cache"),
            "WANDB_DATA_DIR": str(home / "data"), "MLFLOW_TRACKING_URI": (root / "mlruns").as_uri(),
            "MLFLOW_ALLOW_FILE_STORE": "true", "MLFLOW_EXPERIMENT_NAME": "tests"}


def csv_rows(output_dir: Path) -> list[dict[str, str]]:
    with (Path(output_dir) / "metrics.csv").open(newline="") as file:
        return list(csv.DictReader(file))


def _wandb_records(path: Path):
    """Every record (protobuf `Record`) of one offline run's `run-<id>.wandb` file, in order."""
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == b":W&B", f"{path} is not a W&B transaction log"
    offset, chunks = 7, []  # 7-byte file header: ":W&B", magic, version
    while offset + 7 <= len(data):
        left = _WANDB_BLOCK - offset % _WANDB_BLOCK
        length, kind = struct.unpack("<HB", data[offset + 4 : offset + 7]) if left >= 7 else (0, 0)
        if kind == 0:  # block padding
            offset += left
            continue
        if offset + 7 + length > len(data):  # W&B is still writing this record
            return
        chunks.append(data[offset + 7 : offset + 7 + length])
        offset += 7 + length
        if kind in (1, 4):  # a full record, or the last chunk of one
            record = wandb_internal_pb2.Record()
            record.ParseFromString(b"".join(chunks))
            chunks = []
            yield record


def wandb_segments(output_dir: Path, finished: int = 0, timeout: float = 60.0) -> list[dict]:
    """One entry per offline W&B run started in `output_dir` (a resume starts another, oldest first):
    its run id (also in its directory name), whether it resumes that run (so `wandb sync` appends to it), config
    keys, and history rows as `{metric: value}` with the step under "_step". A segment killed with SIGKILL may
    hold nothing: W&B buffers its log and loses the unflushed part. W&B also writes a finished run's log after
    `finish()` returns: wait until `finished` segments hold their exit record."""
    deadline = time.monotonic() + timeout
    segments = _read_segments(output_dir)
    while sum(segment["exited"] for segment in segments) < finished:
        assert time.monotonic() < deadline, f"W&B wrote fewer than {finished} finished runs in {timeout} s"
        time.sleep(0.2)
        segments = _read_segments(output_dir)
    return segments


def _read_segments(output_dir: Path) -> list[dict]:
    segments = []
    for directory in sorted((Path(output_dir) / "wandb").glob("offline-run-*")):
        segment = {"directory_id": directory.name.rsplit("-", 1)[1], "run_id": None, "resume": None,
                   "config": set(), "history": [], "exited": False}
        for record in _wandb_records(next(directory.glob("run-*.wandb"))):
            kind = record.WhichOneof("record_type")
            if kind == "run":
                segment["run_id"], segment["resume"] = record.run.run_id, record.run.resume
                segment["config"] |= {item.key for item in record.run.config.update}
            elif kind == "exit":
                segment["exited"] = True
            elif kind == "history":
                segment["history"].append({item.key or "/".join(item.nested_key): json.loads(item.value_json)
                                           for item in record.history.item})
        segments.append(segment)
    return segments


def mlflow_run(output_dir: Path):
    """(client, run) of the MLflow run the sink recorded in `output_dir/mlflow_run.json`."""
    from mlflow.tracking import MlflowClient

    state = json.loads((Path(output_dir) / "mlflow_run.json").read_text())
    client = MlflowClient(tracking_uri=state["tracking_uri"])
    return client, client.get_run(state["run_id"])


def mlflow_history(output_dir: Path, key: str) -> list[tuple[int, float]]:
    """(step, value) of one metric, in the order MLflow holds them."""
    client, run = mlflow_run(output_dir)
    return [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, key)]
