"""What a checkpoint's state tree is, leaf by leaf, and the refusal when it is not the tree to restore into.

A restore is strict: every leaf's dotted path, shape and dtype (`tree_signature`) must match the target's before
any array is read, so another optimizer, `param_dtype` or model fails naming the keys instead of loading wrong
values. The signatures come from metadata only (`CheckpointManager.stored_signature`), and a resume in the other
`scan_layers` layout maps stored names to this run's with `path_name`.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

import jax

from easytrain.errors import EasytrainError
from easytrain.listing import listed

Signature = dict[str, tuple[tuple[int, ...], str]]


class CheckpointMismatchError(EasytrainError, ValueError):
    """The stored state tree differs from the tree the caller wants to restore into.

    Attributes:
        missing: Keys the caller expects but the checkpoint lacks.
        unexpected: Keys stored in the checkpoint that the caller does not expect.
        mismatched: ``key -> (stored, expected)`` shape/dtype descriptions.
    """

    def __init__(self, missing: list[str], unexpected: list[str], mismatched: dict[str, tuple[str, str]]):
        self.missing, self.unexpected, self.mismatched = missing, unexpected, mismatched
        lines = ["checkpoint does not match the state to restore into (nothing was loaded; another optimizer or "
                 "optimizer settings, param_dtype or model than the checkpoint's, or a damaged checkpoint: resume an "
                 "earlier step?):"]
        lines += _first(f"missing in checkpoint: {key}" for key in missing)
        lines += _first(f"unexpected in checkpoint: {key}" for key in unexpected)
        lines += _first(f"{key}: stored {got}, expected {want}" for key, (got, want) in mismatched.items())
        super().__init__("\n".join(lines))


class CheckpointStructureError(CheckpointMismatchError):
    """Every stored array fits the state to restore into, but the two trees have other nodes (Orbax compares the
    empty ones too: an optimizer's stateless steps). The checkpoint is intact; the run builds another state.

    Attributes:
        checkpoint: The checkpoint's directory.
        detail: Orbax's comparison of the two trees.
    """

    def __init__(self, checkpoint: Path, detail: str):
        self.checkpoint, self.detail = checkpoint, detail
        self.missing, self.unexpected, self.mismatched = [], [], {}
        EasytrainError.__init__(self, "\n".join([
            f"the checkpoint {checkpoint} is intact (nothing was loaded, nothing changed), but this run builds a state "
            "tree of other nodes around the same arrays: its settings differ from the checkpoint's. Compare this run's "
            f"arguments with the checkpoint's ({Path(checkpoint) / 'run_info' / 'metadata'}, or the run's "
            "arguments.json): above all the optimizer's, and a configure_optimizer or model code changed since. "
            "Where the trees differ (Orbax's Source: this run's state, Target: the checkpoint's):",
            *_first(differing_nodes(detail), shown=4),
            "Resume with the checkpoint's settings and code, or start a new output_dir from its weights with "
            f"--init_weights_from {checkpoint} (a fresh optimizer state)."]))


def differing_nodes(detail: str) -> list[str]:
    """Orbax's comparison of two trees as one entry per node that differs: its path line with the lines indented
    under it (Source, Target), so that a count of what is left out counts nodes, not Orbax's three lines a node.
    Orbax's heading (the first line), its blank lines and its `partial_restore` hint are dropped."""
    nodes: list[list[str]] = []
    for line in detail.strip().splitlines()[1:]:
        if not line.strip() or "partial_restore" in line:
            continue
        if line[0].isspace() and nodes:
            nodes[-1].append(line)
        else:
            nodes.append([line])
    return ["\n".join(node) for node in nodes]


def _first(lines: Iterable[str], shown: int = 8) -> list[str]:
    """At most `shown` entries (one line each, or several: `differing_nodes`), every line indented, then how many
    more entries there were: a whole optimizer state would fill a screen."""
    return [f"  {line}" for line in listed(lines, shown, "\n").splitlines()]


def _key_name(entry: Any) -> str:
    """One path entry as Orbax names it (dict key, attribute or index)."""
    for attr in ("key", "name", "idx"):
        if hasattr(entry, attr):
            return str(getattr(entry, attr))
    return str(entry)


def path_name(path: tuple[Any, ...]) -> str:
    """Dotted name of a pytree path; dicts, dataclasses and namedtuples agree."""
    return ".".join(_key_name(entry) for entry in path)


def _leaf_signature(leaf: Any) -> tuple[tuple[int, ...], str]:
    """(shape, dtype) as stored on disk; typed PRNG keys are stored as raw key data."""
    dtype = getattr(leaf, "dtype", None)
    if dtype is None:
        return tuple(getattr(leaf, "shape", ())), type(leaf).__name__
    if jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key):
        leaf = jax.eval_shape(jax.random.key_data, leaf)
    return tuple(leaf.shape), str(leaf.dtype)


def tree_signature(tree: Any) -> Signature:
    """Maps every leaf's dotted path to its (shape, dtype)."""
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {path_name(path): _leaf_signature(leaf) for path, leaf in leaves}


def _describe(signature: tuple[tuple[int, ...], str]) -> str:
    shape, dtype = signature
    return f"{dtype}{list(shape)}"


def check_signatures(stored: Signature, expected: Signature) -> None:
    """Raises CheckpointMismatchError unless both trees have identical leaves.

    Raises:
        CheckpointMismatchError: listing missing, unexpected and mismatched keys.
    """
    missing = sorted(expected.keys() - stored.keys())
    unexpected = sorted(stored.keys() - expected.keys())
    mismatched = {
        key: (_describe(stored[key]), _describe(expected[key]))
        for key in sorted(stored.keys() & expected.keys())
        if stored[key] != expected[key]
    }
    if missing or unexpected or mismatched:
        raise CheckpointMismatchError(missing, unexpected, mismatched)
