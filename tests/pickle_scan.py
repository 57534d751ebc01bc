"""A scan of a run directory for pickles: every file must be of a kind the run is known to write, checked by
its content (JSON, safetensors, TensorBoard events, Orbax/OCDBT data), and none may hold pickle data."""

import json
import re
import struct
from pathlib import Path

from event_files import tfrecords

PICKLE_PRONE = {".pkl", ".pickle", ".pt", ".pth", ".bin", ".ckpt", ".joblib", ".npy", ".npz", ".msgpack"}
JSON_NAMES = {"_CHECKPOINT_METADATA", "_METADATA", "_sharding", "metadata"}
OCDBT_MAGIC = (b"\x0c\xdb\x3a\x2a", b"\x0c\xdb\x20\xde")  # tensorstore OCDBT manifest, B-tree node
ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"  # OCDBT value files are zstd frames of raw array bytes


def is_json(data: bytes) -> bool:
    try:
        json.loads(data)
    except ValueError:
        return False
    return True


def is_safetensors(data: bytes) -> bool:
    """8-byte little-endian header length, a JSON header, and exactly the bytes it declares."""
    if len(data) < 8:
        return False
    (size,) = struct.unpack("<Q", data[:8])
    try:
        header = json.loads(data[8:8 + size])
        ends = [entry["data_offsets"][1] for name, entry in header.items() if name != "__metadata__"]
    except (ValueError, KeyError, TypeError, IndexError, AttributeError):
        return False
    return max(ends, default=0) == len(data) - 8 - size


def is_event_file(data: bytes) -> bool:
    """Whole TFRecords, each an `Event` proto, then at most the torn start of one more (a killed writer)."""
    from tensorboardX.proto import event_pb2
    from tensorboardX.record_writer import masked_crc32c

    payloads, consumed = tfrecords(data)
    try:
        [event_pb2.Event.FromString(payload) for payload in payloads]
    except Exception:  # noqa: BLE001 -- any decode error means "not an event file"
        return False
    rest = data[consumed:]
    if len(rest) < 12:
        return rest[:1] != b"\x80"
    (length,) = struct.unpack("<Q", rest[:8])
    return rest[8:12] == struct.pack("<I", masked_crc32c(rest[:8])) and len(rest) < 16 + length


def known_kind(path: Path, data: bytes) -> bool:
    """Every kind of file a run writes, each checked by its content, not only by its name."""
    name = path.name
    if name.endswith(".json") or name in JSON_NAMES or path.parent.name == "array_metadatas":
        return is_json(data)
    if name.endswith(".jsonl"):
        return all(is_json(line) for line in data.splitlines())
    if name.endswith(".safetensors"):
        return is_safetensors(data)
    if name.startswith("events.out.tfevents."):
        return is_event_file(data)
    if name == ".easytrain.lock":  # easytrain.trainers.run_lock: empty, or the holder while a run trains
        return re.fullmatch(rb"(pid \d+ on \S+\n)?", data) is not None
    if name == "commit_success.txt":
        return data.startswith(b"Checkpoint commit was successful")
    if name == "manifest.ocdbt" or path.parent.name == "d":
        return data.startswith(OCDBT_MAGIC) or (path.parent.name == "d" and data.startswith(ZSTD_MAGIC))
    return False


def scan_for_pickles(root: Path) -> list[str]:
    """Problems found under `root`: pickle data, pickle-prone file types, or files of no known kind."""
    problems = []
    for path in sorted(root.rglob("*")):
        relative = path.relative_to(root)
        if path.is_dir() and not path.is_symlink():
            continue
        if path.is_symlink() or not path.is_file():
            problems.append(f"{relative}: not a plain file")
            continue
        data = path.read_bytes()
        if data[:1] == b"\x80" and data[1:2] and 2 <= data[1] <= 5:
            problems.append(f"{relative}: starts with a pickle protocol {data[1]} header")
        elif path.suffix.lower() in PICKLE_PRONE:
            problems.append(f"{relative}: a {path.suffix} file (pickle-prone format)")
        elif not known_kind(path, data):
            problems.append(f"{relative}: not a known file kind")
    return problems
