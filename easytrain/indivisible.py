"""Dimensions a mesh axis does not divide: the logical axis of whole blocks (attention heads), and the one
warning that says which parameters were replicated because of them, and how to shard them.

A parameter dimension whose mesh axis does not divide it is replicated over that axis (`sharding._resolve`): the
numbers stay right, but every device holds the parameter and its optimizer moments whole, so `fsdp_size` or
`tensor_parallel_size` saves no memory on it. That is worth one warning per run, never an error: per finding in
a process, so that a second trainer on another mesh is warned about its own.
"""

from __future__ import annotations

import logging
from typing import Any, Mapping, NamedTuple, Sequence

from jax.sharding import PartitionSpec as P

logger = logging.getLogger("easytrain")


class BlockedAxis(str):
    """A logical axis name for a dimension of `blocks` equal blocks that must stay whole on a device (the heads of
    an attention projection: `blocks` heads of `head_dim` columns): a mesh axis splits it only if it divides
    `blocks`. `field` names the config field that sets `blocks`, for the warning. It compares and hashes as the bare
    name, so rules, saved axes and tests see just the name, and it travels wherever the axes are copied (layer
    stacking, LoRA adapters)."""

    blocks: int | None
    field: str | None

    def __new__(cls, name: str, blocks: int | None = None, field: str | None = None) -> BlockedAxis:
        axis = super().__new__(cls, name)
        axis.blocks, axis.field = blocks, field
        return axis


class Dropped(NamedTuple):
    """A dimension named `name` that its rule's mesh `axes` (`size` devices together) do not divide: `count` is its
    length, or its blocks."""

    name: str
    count: int
    axes: tuple[str, ...]
    size: int


#: The config field that sets each default logical axis's length, named in the warning's fix.
AXIS_FIELDS = {"embed": "hidden_size", "mlp": "intermediate_size", "vocab": "vocab_size",
               "heads": "num_attention_heads"}
#: The findings warned about in this process: (mesh axes, their size, config field, its length). Keyed by what the
#: warning says, not by the axes alone, so a second trainer of a notebook or sweep on another mesh (or with another
#: model) is warned about its own parameters, while one set-up placing them again (optimizer, reload, stacking)
#: repeats nothing.
_WARNED_INDIVISIBLE: set[tuple[tuple[str, ...], int, str, int]] = set()


def warn_indivisible(dropped: Sequence[tuple[str, int, Dropped]], params: Sequence[tuple[str, P, int]],
                     mesh: Any, mesh_fields: Mapping[str, str]) -> set[str]:
    """Warn once per run, in one message, about the parameters (`dropped`: path, bytes, dimension) replicated over
    mesh axes that do not divide them, among `params` (path, spec, bytes). A finding already warned about in this
    process (the same axes and size, field and length) is not repeated. Returns the mesh axes such parameters
    explain (warned now or before), so the warning about axes that split nothing does not repeat it."""
    groups: dict[tuple[str, ...], list[tuple[str, int, Dropped]]] = {}
    for entry in dropped:
        groups.setdefault(entry[2].axes, []).append(entry)
    explained = {axis for axes in groups for axis in axes}
    new = {axes: entries for axes, entries in groups.items() if not _findings(entries) <= _WARNED_INDIVISIBLE}
    if not new:
        return explained
    for entries in new.values():
        _WARNED_INDIVISIBLE.update(_findings(entries))
    total_bytes = sum(nbytes for *_, nbytes in params)
    parts = []
    for axes, entries in new.items():
        label = " * ".join(f"{mesh_fields.get(axis, axis)}={mesh.shape[axis]}" for axis in axes)
        replicated = dict((where, nbytes) for where, nbytes, _ in entries)
        shown = {where: f"{where} ({_field(dim)} {dim.count})" for where, _, dim in entries}
        first = {(_field(dim), dim.count): where for where, _, dim in reversed(entries)}.values()  # one per field
        examples = [shown[where] for where in sorted(first, key=list(shown).index)]
        examples += [text for where, text in shown.items() if where not in first]
        splits_some = any(axis in str(spec) for _, spec, _ in params for axis in axes)
        fixes = sorted({_fix(dim) for _, _, dim in entries})
        parts.append(f"{label} does not divide a dimension of {len(replicated)} of {len(params)} parameters "
                     f"({sum(replicated.values()):,} of {total_bytes:,} bytes)"
                     + ("" if splits_some else ", so it splits no parameter at all")
                     + f", e.g. {'; '.join(examples[:4])}. Fix: {'; '.join(fixes)}; or set "
                       f"{' * '.join(mesh_fields.get(axis, axis) for axis in axes)} to a size that divides them")
    logger.warning("Parameters replicated where a mesh axis does not divide their dimension (every device holds "
                   "them and their optimizer moments whole): %s.", ". ".join(parts))
    return explained


def _findings(entries: Sequence[tuple[str, int, Dropped]]) -> set[tuple[tuple[str, ...], int, str, int]]:
    """What the warning about `entries` says, without paths or bytes: (axes, size, field, length) per dimension."""
    return {(dim.axes, dim.size, _field(dim), dim.count) for _, _, dim in entries}


def _field(dim: Dropped) -> str:
    """The config field that sets `dim`'s length (its blocks' for a `BlockedAxis`), else its logical axis."""
    return getattr(dim.name, "field", None) or AXIS_FIELDS.get(str(dim.name), f"logical axis {str(dim.name)!r}")


def _fix(dim: Dropped) -> str:
    field = _field(dim)
    if field == "vocab_size":
        return f"pad vocab_size to a multiple of {dim.size} ({-(-dim.count // dim.size) * dim.size})"
    return f"choose a {field} that {dim.size} divides"
