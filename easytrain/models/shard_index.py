"""Which safetensors files a Hugging Face checkpoint holds, and each stored tensor's header (no tensor data).

A sharded checkpoint names its files in ``model.safetensors.index.json``. The index is read as a damaged file
wherever it cannot say which file holds a tensor, or names one outside the checkpoint directory (a hub repository
cannot hold such an entry, and a load must not read from elsewhere); files in a subdirectory are read, as
transformers reads them.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path, PurePosixPath

from safetensors import SafetensorError, safe_open

from easytrain.listing import listed
from easytrain.models.hf_io import WEIGHTS_INDEX_NAME, WEIGHTS_NAME, CheckpointError, damaged_file, read_json_object


@dataclasses.dataclass(frozen=True)
class TensorEntry:
    """One stored tensor as its safetensors header describes it (no data read)."""

    file: Path
    shape: tuple[int, ...]
    dtype: str


def weight_files(directory: Path) -> tuple[list[Path], dict[str, str] | None]:
    """The safetensors files to read, and the index's weight map when the checkpoint is sharded."""
    if (directory / WEIGHTS_NAME).is_file():
        return [directory / WEIGHTS_NAME], None
    index_path = directory / WEIGHTS_INDEX_NAME
    if not index_path.is_file():
        raise CheckpointError(
            f"no {WEIGHTS_NAME} or {WEIGHTS_INDEX_NAME} in {directory}; only safetensors "
            "checkpoints are supported (re-save other formats as safetensors)."
        )
    weight_map = _weight_map(index_path)
    files = sorted({_shard_path(directory, name) for name in weight_map.values()})
    if absent := [str(f.relative_to(directory)) for f in files if not f.is_file()]:
        raise CheckpointError(f"{index_path} names shard files that are not in {directory}: {absent}; "
                              "download or copy every shard.")
    return files, weight_map


def _weight_map(index_path: Path) -> dict[str, str]:
    """The index's tensor name -> shard file name map, or a `damaged_file` refusal naming the index."""
    weight_map = read_json_object(index_path).get("weight_map")
    if not isinstance(weight_map, dict):
        raise damaged_file(index_path, TypeError(f"its 'weight_map' is a JSON {type(weight_map).__name__}, not an "
                                                 "object of tensor name -> shard file name"))
    if not weight_map:
        raise damaged_file(index_path, ValueError("its 'weight_map' names no tensor"))
    if odd := sorted(name for name, file in weight_map.items() if not isinstance(file, str)):
        raise damaged_file(index_path, TypeError(f"'weight_map' maps {listed(odd, 8)} to no file name (a "
                                                 f"JSON {type(weight_map[odd[0]]).__name__}, not a string)"))
    if outside := sorted(name for name, file in weight_map.items() if _outside(file)):
        files = sorted({repr(weight_map[name]) for name in outside})
        raise damaged_file(index_path, ValueError(
            f"'weight_map' maps {len(outside)} tensor(s) ({listed(outside, 2)}) to {listed(files, 8)}, "
            f"outside {index_path.parent}: a checkpoint directory holds its own shards (a hub repository cannot name "
            "such a file; a copy made by hand: move the shards into the directory, named relative to it)"))
    return weight_map


def _outside(name: str) -> bool:
    """Whether the shard file name `name` leads out of the checkpoint directory (absolute, or up past it). A
    subdirectory stays inside, as transformers joins each name to the directory; symlinks are not followed (a hub
    cache snapshot links every file to its blob elsewhere)."""
    return PurePosixPath(name).is_absolute() or os.path.normpath(name).split("/")[0] == ".."


def _shard_path(directory: Path, name: str) -> Path:
    """Where the index's `name` is read from: one path for each spelling of one file (`a/../b`, `./b`: `b`)."""
    return directory / os.path.normpath(name)


def read_headers(directory: Path) -> dict[str, TensorEntry]:
    """Name -> file, shape and dtype of every stored tensor, from the headers alone."""
    files, weight_map = weight_files(directory)
    entries: dict[str, TensorEntry] = {}
    for file in files:
        try:
            with safe_open(file, framework="numpy") as handle:
                for name in handle.keys():
                    view = handle.get_slice(name)
                    if name in entries:  # which copy is the model's? the later one was read without a word
                        raise damaged_file(directory / WEIGHTS_INDEX_NAME, ValueError(
                            f"{name} is held by both {entries[name].file.relative_to(directory)} and "
                            f"{file.relative_to(directory)}; one of them is left from another save"))
                    entries[name] = TensorEntry(file, tuple(view.get_shape()), view.get_dtype())
        except SafetensorError as error:  # a header cut short, or tensors past the end of the file
            raise damaged_file(file, error) from error
    if weight_map is not None:
        misplaced = sorted(n for n, f in weight_map.items()
                           if n not in entries or entries[n].file != _shard_path(directory, f))
        if misplaced:
            raise CheckpointError(f"{directory / WEIGHTS_INDEX_NAME} maps tensors to files that do not hold "
                                  f"them: {misplaced[:8]}; the index and the shards are out of sync.")
    return entries
