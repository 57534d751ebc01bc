"""Writing safetensors files readable as every other file of an export is.

safetensors writes its files with mode 0600 whatever the process's umask, so a model exported on a shared
filesystem (a cluster's project directory) could not be loaded by the rest of a group, though its config.json and
tokenizer files beside it could. The weights get the mode an ordinary new file gets (0666 less the umask).
"""

from __future__ import annotations

import os
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
    os.chmod(path, 0o666 & ~current_umask())
    return path
