"""Weights-only initialisation (`init_weights_from`): start a fresh run from another run's weights.

The source is an exported model directory (`config.json` + safetensors) or a checkpoint of another run
(its output directory, its `checkpoints/` directory or one `checkpoints/<step>`). Only module variables
are read: parameters and statistics such as BatchNorm's, matched by variable path; decoder layers stored
stacked (`scan_layers`) in the source or in this run are stacked or split to this run's layout. The
optimizer state, the step, the RNG and the data order start fresh, which is what distinguishes this from
resuming.

A checkpoint's arrays are read in the dtype they were stored in and checked against its fingerprint (digests
of the stored bits) before they are cast to this run's `param_dtype`; files that cannot be read, or values that
differ from the fingerprint, are a `CheckpointReadError` naming `init_weights_from` and the checkpoint.

A trainer that starts two states from the source (DPO's reference and policy) reads it once: `replaced_weights`
keeps what it put into the first, `put_weights` puts copies of them into the second.
"""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path
from typing import Any, Callable, Iterator

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp
from flax import nnx

from easytrain import checkpoint_items, integrity
from easytrain.checkpoint import CheckpointNotFoundError, resolve_checkpoint
from easytrain.checkpoint_read_errors import source_read_error
from easytrain.errors import ArgumentError
from easytrain.listing import listed
from easytrain.models.scan import STACKED, abstract_layer, abstract_stack
from easytrain.state import TrainState
from easytrain.trainers.lora_record import source_run_info

logger = logging.getLogger("easytrain")

VariablePath = tuple[str, ...]
#: The `TrainState` fields that hold module variables (`base` is never in a checkpoint).
MODULE_PARTS = ("params", "base", "model_state")


def _key(path: Any) -> str:
    return str(getattr(path, "key", getattr(path, "idx", getattr(path, "name", path))))


def _is_weight(leaf: Any) -> bool:
    """Float arrays only: integer leaves are counters and RNG keys, which a fresh run draws anew."""
    dtype = getattr(leaf, "dtype", None)
    if dtype is None or jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key):
        return False
    return bool(jnp.issubdtype(dtype, jnp.floating))


def _flat(tree: Any) -> dict[VariablePath, Any]:
    return {tuple(_key(p) for p in path): leaf for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def float_leaves(tree: Any) -> dict[str, Any]:
    """Dotted variable path -> leaf of the float leaves of a pure tree: its weights (for their digests)."""
    return {".".join(path): leaf for path, leaf in _flat(tree).items() if _is_weight(leaf)}


def module_weights(state: TrainState) -> dict[VariablePath, tuple[str, VariablePath]]:
    """Variable path -> (state part, path inside it) of every float module variable of `state`."""
    found = {}
    for part in MODULE_PARTS:
        for path, leaf in _flat(getattr(state, part)).items():
            if _is_weight(leaf):
                found[path] = (part, path)
    return found


def _pretrained_weights(directory: Path, load: Callable[[Path], nnx.Module]) -> dict[VariablePath, jax.Array]:
    module = load(directory)
    return {path: leaf for path, leaf in _flat(nnx.to_pure_dict(nnx.state(module))).items() if _is_weight(leaf)}


def _stored(root: Path, step: int) -> tuple[Path, int, dict[VariablePath, Any]]:
    """The checkpoint's directory, step and flat metadata of its whole state. Read through the handler, which
    raises on a damaged file (the checkpointer's `metadata` logs it and returns no tree)."""
    with _reading(root, step), contextlib.closing(ocp.PyTreeCheckpointHandler()) as handler:
        tree = handler.metadata(root / str(step) / "state").tree
        if not isinstance(tree, dict):
            raise ValueError(f"the state's metadata holds no tree of arrays (got {type(tree).__name__})")
        return root, step, _flat(tree)


@contextlib.contextmanager
def _reading(root: Path, step: int) -> Iterator[None]:
    """Any failure to read checkpoint `step` as a `CheckpointReadError`: the reader's own exception (an
    `IndexError`, a TensorStore spec) names neither the argument nor what to do."""
    try:
        yield
    except Exception as error:
        raise source_read_error(root, step, error) from error


def _layer_paths(path: VariablePath, count: int) -> list[VariablePath]:
    """The per-layer paths of a stacked variable's path: `STACKED` replaced by each layer's index."""
    at = path.index(STACKED)
    return [path[:at] + (str(index),) + path[at + 1:] for index in range(count)]


def _split_layers(flat: dict[VariablePath, Any], take: Callable[[Any, int], Any]) -> dict[VariablePath, Any]:
    """Stacked variables (paths through `STACKED`) as per-layer ones, `take(value, index)` each."""
    out = {}
    for path, value in flat.items():
        pieces = _layer_paths(path, value.shape[0]) if STACKED in path else [path]
        out.update((piece, take(value, i) if STACKED in path else value) for i, piece in enumerate(pieces))
    return out


def _join_layers(flat: dict[VariablePath, Any], stacked: dict[VariablePath, int],
                 stack: Callable[..., Any]) -> dict[VariablePath, Any]:
    """The per-layer variables of each `stacked` path (-> its layer count) as that one stacked variable, when
    all its layers are there with one shape; anything else as it is."""
    out = dict(flat)
    for path, count in stacked.items():
        pieces = _layer_paths(path, count)
        if all(p in out and isinstance(out[p], (jax.Array, jax.ShapeDtypeStruct)) for p in pieces) and \
                len({tuple(out[p].shape) for p in pieces}) == 1:
            out[path] = stack(*(out.pop(p) for p in pieces))
    return out


def _slice(value: Any, index: int) -> Any:
    return value[index] if isinstance(value, jax.Array) else jax.ShapeDtypeStruct(value.shape[1:], value.dtype)


def _checkpoint_weights(source: str, wanted: dict[VariablePath, jax.ShapeDtypeStruct]) -> dict[VariablePath, Any]:
    """`_restored_weights`, from a checkpoint whose decoder layers are stacked (`scan_layers`) or not, in this
    model's layout: read in the checkpoint's layout, then stacked or split."""
    checkpoint = _stored(*resolve_checkpoint(".", source))
    theirs = {path[1:]: meta.shape[0] for path, meta in checkpoint[2].items()
              if path[0] in ("params", "model_state") and STACKED in path}
    ours = {path: leaf.shape[0] for path, leaf in wanted.items() if STACKED in path}
    if ours and not theirs:
        found = _restored_weights(checkpoint, _split_layers(wanted, lambda leaf, _: abstract_layer(leaf)))
        return _join_layers(found, ours, lambda *values: jnp.stack(values))
    if theirs and not ours:
        found = _restored_weights(checkpoint, _join_layers(wanted, theirs, abstract_stack))
        return _split_layers(found, _slice)
    return _restored_weights(checkpoint, wanted)


def _restored_weights(checkpoint: tuple[Path, int, dict[VariablePath, Any]],
                      wanted: dict[VariablePath, jax.ShapeDtypeStruct]) -> dict[VariablePath, Any]:
    """Restore only the module variables of another run's checkpoint (`_stored`) whose paths this model has
    (others are reported as unexpected by the caller from the metadata), verified against its fingerprint.

    They are restored in the dtype they were stored in, since the fingerprint digests the stored bits; the
    caller casts them to this run's dtype (a bfloat16 checkpoint into a float32 run, or the reverse)."""
    root, step, stored = checkpoint
    item = root / str(step) / "state"
    available = {path[1:]: path for path in stored if path[0] in ("params", "model_state")
                 and _is_weight(stored[path])}
    target: dict = {}
    for variable, saved_path in available.items():
        if variable in wanted and tuple(stored[saved_path].shape) == wanted[variable].shape:
            node = target
            for key in saved_path[:-1]:
                node = node.setdefault(key, {})
            node[saved_path[-1]] = jax.ShapeDtypeStruct(wanted[variable].shape, stored[saved_path].dtype,
                                                        sharding=wanted[variable].sharding)
    if not target:  # nothing fits: the caller reports every tensor
        return {variable: stored[path] for variable, path in available.items()}
    with _reading(root, step):
        restored = ocp.PyTreeCheckpointer().restore(item, args=ocp.args.PyTreeRestore(
            target, restore_args=ocp.checkpoint_utils.construct_restore_args(target), partial_restore=True))
        if checkpoint_items.present(root / str(step), "fingerprint"):  # one its metadata lists must be there
            expected = ocp.Checkpointer(ocp.JsonCheckpointHandler()).restore(root / str(step) / "fingerprint")
            integrity.verify(restored, dict(expected), where=str(root / str(step)))
    values = {path[1:]: leaf for path, leaf in _flat(restored).items()}
    # Paths present but with another shape come back as metadata, so the caller can name them.
    return {**{variable: stored[path] for variable, path in available.items() if variable not in values}, **values}


def _source_kind(source: str) -> str:
    path = Path(source).expanduser()
    if (path / "config.json").is_file() and any(path.glob("*.safetensors")):
        return "pretrained"
    try:
        resolve_checkpoint(".", str(path))
    except CheckpointNotFoundError:
        raise ArgumentError("init_weights_from", f"{source} is neither an exported model directory (config.json + "
                                                 "*.safetensors) nor a run's checkpoint (output_dir, checkpoints/ or "
                                                 "checkpoints/<step>).") from None
    return "checkpoint"


def resolved_source(source: str) -> str:
    """Where `source`'s weights are read from now: the exported model directory, or the one checkpoint it names
    (the latest, when it names a run's output_dir or checkpoints/, which may be another once that run goes on)."""
    path = Path(source).expanduser()
    if _source_kind(source) == "pretrained":
        return str(path.absolute())
    root, step = resolve_checkpoint(".", str(path))
    return str(Path(root).absolute() / str(step))


def initialise_from(source: str, state: TrainState, shardings: TrainState, *, load_pretrained: Callable[[Path], Any],
                    fresh_ok: Callable[[VariablePath, str], bool], resuming: bool = False) -> TrainState:
    """`state` with its module variables replaced by `source`'s, placed like `shardings`.

    Args:
        source: the `init_weights_from` value.
        state / shardings: the freshly placed state and its layout.
        load_pretrained: loads an exported model directory as a module (on the mesh).
        fresh_ok: whether a variable the source lacks may keep its fresh value (e.g. new LoRA adapters).
        resuming: a LoRA resume, which restores all but the frozen base from its own checkpoint: only the base is
            taken from the source, where it supplies one (`_resumed_base`), and the source's base is not compared.

    Raises:
        ArgumentError: naming `init_weights_from`, with every missing, unexpected or misshapen tensor.
    """
    ours = module_weights(state)
    if resuming and not (ours := _resumed_base(source, ours, fresh_ok)):
        return state
    wanted = {}
    for path, (part, inner) in ours.items():
        leaf = _leaf(state, part, inner)
        wanted[path] = jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=_leaf(shardings, part, inner))
    if _source_kind(source) == "pretrained":  # an export holds separate layers: stacked where this run stacks them
        stacked = {path: leaf.shape[0] for path, leaf in wanted.items() if STACKED in path}
        theirs = _join_layers(_pretrained_weights(Path(source).expanduser(), load_pretrained), stacked,
                              lambda *values: jnp.stack(values))
    else:
        theirs = _checkpoint_weights(source, wanted)
    problems = [f"{'.'.join(p)}: source {tuple(theirs[p].shape)} vs model {wanted[p].shape}"
                for p in sorted(theirs.keys() & wanted.keys()) if tuple(theirs[p].shape) != wanted[p].shape]
    problems += [f"{'.'.join(p)}: not in this model" for p in sorted(theirs.keys() - wanted.keys()) if not resuming]
    problems += [f"{'.'.join(p)}: missing from the source" for p in sorted(wanted.keys() - theirs.keys())
                 if not fresh_ok(p, ours[p][0])]
    if problems:
        raise ArgumentError("init_weights_from", f"{source} does not fit this model ({len(problems)} tensor(s): "
                                                 f"{listed(problems, 6, '; ')}). Use weights of the same architecture "
                                                 "(model_config or model_name_or_path), or resume_from_checkpoint to "
                                                 "continue a run.")
    if not resuming:
        warn_other_base(source, state.base)
    replaced = {part: jax.tree.map(lambda x: x, getattr(state, part)) for part in MODULE_PARTS}
    for path, (part, inner) in ours.items():
        if path in theirs:
            value = jax.device_put(theirs[path], wanted[path].sharding).astype(wanted[path].dtype)
            _assign(replaced[part], inner, value)
    return state.replace(**replaced)


def _resumed_base(source: str, ours: dict[VariablePath, tuple[str, VariablePath]],
                  fresh_ok: Callable[[VariablePath, str], bool]) -> dict[VariablePath, tuple[str, VariablePath]]:
    """Of `ours` (`module_weights`), what a resume reads from `source`: the frozen base alone (the restore brings
    back everything else, so the source's adapters may be gone or of another rank since). Nothing when the base may
    stay as placed (model_name_or_path's) and `source` is no longer there: the resume then checks that base against
    the one its checkpoint recorded, as it does any LoRA base."""
    base = {path: where for path, where in ours.items() if where[0] == "base"}
    if base and all(fresh_ok(path, part) for path, (part, _) in base.items()):
        try:
            _source_kind(source)
        except ArgumentError:
            logger.info("init_weights_from %s is gone: the resume takes its base from model_name_or_path", source)
            return {}
    return base


def warn_other_base(source: str, base: Any) -> None:
    """Warn when `source` is a LoRA checkpoint whose adapters were trained on another frozen base than `base` (this
    run's, from model_name_or_path): they start here as asked, but compute another function than in the source run.
    A warning, not a refusal: a new run may move adapters onto a related base on purpose (a resume, which must
    continue the same function, refuses it). Compared by the digests the source recorded (`base_fingerprint`), which
    are of the stored bits: only where both bases are stored in one dtype (`_stored_dtypes`)."""
    if not base or not (recorded := (info := source_run_info(source)).get("base_fingerprint")):
        return  # no base (full fine-tuning): the source's run_info is not read
    theirs, ours = _stored_dtypes(info, base)
    if theirs and ours != {theirs}:
        logger.info("init_weights_from %s: its base was stored in %s (its param_dtype), this run's in %s; their "
                    "digests differ whatever the weights, so the bases are not compared", source, theirs,
                    ", ".join(sorted(ours)))
        return
    actual = integrity.fingerprint(base)
    if not (common := recorded.keys() & actual.keys()):
        logger.info("init_weights_from %s: its base was recorded in another scan_layers layout; not compared with "
                    "this run's", source)
        return
    if changed := sorted(name for name in common if recorded[name] != actual[name]):
        logger.warning("init_weights_from %s: its adapters were trained on another base than this run's (%d of %d "
                       "tensor(s) differ: %s): they start on this base as asked, computing another function than in "
                       "the source run. Pass the source run's model_name_or_path to start from its function.", source,
                       len(changed), len(common), listed(changed, 5))


def _stored_dtypes(info: dict[str, Any], base: Any) -> tuple[str | None, set[str]]:
    """The dtype the source run stored its base in (its `param_dtype`; None where its run_info records none) and those
    of this run's base: the same weights stored in two dtypes have other bits, so other digests. (Casting this run's
    base to the source's would be exact only from the wider dtype: a bfloat16 base lost the float32 bits.)"""
    recorded = (info.get("arguments") or {}).get("param_dtype") or (info.get("lora_config") or {}).get("param_dtype")
    return recorded, {str(leaf.dtype) for leaf in jax.tree.leaves(base) if _is_weight(leaf)}


def _leaf(tree_owner: Any, part: str, inner: VariablePath) -> Any:
    node = getattr(tree_owner, part)
    for key in inner:
        node = node[_match_key(node, key)]
    return node


def _match_key(node: dict, key: str) -> Any:
    return key if key in node else int(key)


def _assign(tree: dict, inner: VariablePath, value: Any) -> None:
    node = tree
    for key in inner[:-1]:
        node = node[_match_key(node, key)]
    node[_match_key(node, inner[-1])] = value


class SourceWeights(dict):
    """Variable path -> value of the variables a source set, and `expected`: the paths it set, so `put_weights`
    can tell an entry removed since from a variable the source left fresh (e.g. new LoRA adapters)."""

    def __init__(self, values: dict[VariablePath, jax.Array]) -> None:
        super().__init__(values)
        self.expected: frozenset[VariablePath] = frozenset(values)


def replaced_weights(before: TrainState, after: TrainState) -> SourceWeights:
    """The module variables `initialise_from` put into `before` to make `after` (it keeps every other leaf as it
    was, the same array), so another state can start from them without reading the source again (`put_weights`)."""
    return SourceWeights({path: _leaf(after, part, inner) for path, (part, inner) in module_weights(after).items()
                          if _leaf(after, part, inner) is not _leaf(before, part, inner)})


def _missing(weights: dict[VariablePath, Any], ours: dict[VariablePath, Any]) -> list[VariablePath]:
    """This state's variables the source set (`SourceWeights.expected`; every float module variable for a plain
    mapping, which does not say what the source left fresh) that `weights` lacks. Paths only, nothing read."""
    expected = weights.expected if isinstance(weights, SourceWeights) else ours.keys()
    return sorted(path for path in expected if path in ours and path not in weights)


def put_weights(state: TrainState, shardings: TrainState, weights: dict[VariablePath, jax.Array], *,
                copy: bool = True) -> TrainState | None:
    """`state` with `weights` (`replaced_weights` of a state laid out as this one) in place, placed like `shardings`;
    with `copy`, in buffers of their own (the train step donates the state: it must not share them with an array
    another holds). None when they do not fit this state (another variable, shape or dtype).

    Raises:
        ValueError: `weights` lack a variable the source set (see `_missing`): placed, it would silently keep its
            random initial value.
    """
    ours = module_weights(state)
    if any(path not in ours or (value.shape, value.dtype) != (_leaf(state, *ours[path]).shape,
                                                              _leaf(state, *ours[path]).dtype)
           for path, value in weights.items()):
        return None
    if missing := _missing(weights, ours):
        raise ValueError(f"put_weights: {len(missing)} variable(s) the source set are missing: "
                         f"{listed(('.'.join(path) for path in missing), 6)}; they would "
                         "keep their random initial values. Pass all of `replaced_weights`' result (or every float "
                         "module variable of the state), or initialise this state from the source itself.")
    replaced = {part: jax.tree.map(lambda x: x, getattr(state, part)) for part in MODULE_PARTS}
    for path, value in weights.items():
        part, inner = ours[path]
        _assign(replaced[part], inner, jax.device_put(value, _leaf(shardings, part, inner),
                                                      may_alias=False if copy else None))
    return state.replace(**replaced)
