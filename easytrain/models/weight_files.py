"""Writing safetensors files readable as every other file of an export is, and the same bytes for the same content.

safetensors writes its files with mode 0600 whatever the process's umask, so a model exported on a shared
filesystem (a cluster's project directory) could not be loaded by the rest of a group, though its config.json and
tokenizer files beside it could. The weights get the mode an ordinary new file gets (0666 less the umask).

It also keeps the header's metadata in a hash map, so two metadata keys come out in either order from one write to
the next: the same adapter exported twice differed in its bytes. The metadata is rewritten in sorted order, in
place (the header keeps its length, so no tensor moves).
"""

from __future__ import annotations

import json
import os
import struct
import threading
from collections.abc import Mapping
from pathlib import Path

import numpy as np
from safetensors.numpy import save_file

_umask_lock = threading.Lock()


def current_umask() -> int:
    """The process's umask (reading it means setting it: done under a lock, restored at once)."""
    with _umask_lock:
        mask = os.umask(0o022)
        os.umask(mask)
    return mask


def write_safetensors(tensors: Mapping[str, np.ndarray], path: str | os.PathLike,
                      metadata: Mapping[str, str] | None = None) -> Path:
    """`safetensors.numpy.save_file`, then the file's mode set as the umask would set a new file's."""
    path = Path(path)
    save_file(dict(tensors), path, metadata=None if metadata is None else dict(metadata))
    if metadata is not None and len(metadata) > 1:
        _sort_metadata(path)
    os.chmod(path, 0o666 & ~current_umask())
    return path


def _sort_metadata(path: Path) -> None:
    """The header's ``__metadata__`` in sorted key order, written over the header in place (same length)."""
    with open(path, "r+b") as file:
        (length,) = struct.unpack("<Q", file.read(8))
        header = json.loads(file.read(length))
        header["__metadata__"] = dict(sorted(header["__metadata__"].items()))
        text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
        if len(text) > length:  # another JSON spelling than safetensors': leave the file as written
            return
        file.seek(8)
        file.write(text.ljust(length, b" "))
