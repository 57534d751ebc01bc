"""Resuming: once `resume_checks` found that a checkpoint can continue this run unchanged, restore it in place.

JSON is read first (run_info, the items saved, the data position), so a refused or damaged checkpoint fails before
any array is loaded; a file that cannot be read fails as `CheckpointReadError`, naming an earlier step to resume, and
a sound checkpoint whose state tree is not this run's as `CheckpointMismatchError`. The changes a resume allows are
warned of once the state is restored, after every check that could refuse it.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any, NamedTuple

import jax

from easytrain import checkpoint_items
from easytrain.checkpoint import CheckpointManager, recorded_updates
from easytrain.checkpoint_read_errors import innermost, resume_read_error
from easytrain.checkpoint_signatures import (CheckpointMismatchError, CheckpointStructureError, path_name,
                                             tree_signature)
from easytrain.data.position import DIGEST_KEY
from easytrain.models.scan import STACKED, abstract_layer, abstract_stack, stack_layer_dicts, unstack_layer_dicts
from easytrain.trainers.restore_checks import (  # noqa: F401 (the checks, importable from here as before)
    check_head_adapter_layout, check_run_length, may_hold_head_adapter, stored_scan_layers)
from easytrain.trainers.resume_checks import (  # noqa: F401 (the checks, importable from here as before)
    ARCHITECTURE_KEYS, COMPUTE_FIELDS, DATA_ORDER_FIELDS, FORMAT_VERSION, FREE_ON_RESUME, LORA_FIELDS, MAX_LISTED,
    SCHEDULE_FIELDS, STATE_FIELDS, check_data_position, check_format, check_resumable, config_dict, moved_data,
    moved_paths, refuse_changes, rerun_hint, warn_changes)

logger = logging.getLogger("easytrain")


class Restored(NamedTuple):
    """What a resumed run continues from. `data_state` is None when `allow_data_order_change` let the data
    settings change (the old position would not mean the same examples)."""

    state: Any
    data_state: dict[str, Any] | None
    callbacks_state: dict[str, Any]


def restore_checkpoint(checkpoint: tuple[Path, int], current: dict[str, Any], target: Any,
                       data_fingerprint: Mapping[str, Any] | None = None) -> Restored:
    """Validate (the run_info against `current`, the saved data position against the train loader's
    `data_fingerprint`), then restore the state straight into `target`'s shapes and shardings, with the data
    position and the callbacks' progress; the changes the resume allows are warned of last."""
    root, step = checkpoint
    with CheckpointManager(root, read_only=True) as manager:  # a live run may be writing there
        try:
            run_info = manager.read_run_info(step)
        except Exception as error:  # any unreadable file means the same to the user: use another checkpoint
            raise resume_read_error(root, step, manager.all_steps(), error) from error
        saved_position = _position_or_error(manager, step)  # read once: two checks below need it
        content_compared = compares_content(saved_position, data_fingerprint)
        data_order_changed = refuse_changes(run_info, current, content_compared)
        stored_args = run_info.get("arguments") or {}
        try:
            recorded = manager.check_items(step)
            progress = manager.read_progress(step)
            saved_updates = recorded_updates(progress, step)
            stored_keys = manager.stored_signature(step) if may_hold_head_adapter(stored_args) else {}
        except Exception as error:
            raise resume_read_error(root, step, manager.all_steps(), error) from error
        check_head_adapter_layout(stored_args, stored_keys)
        if recorded is None:
            logger.info("the checkpoint %s records no list of its items (written before easytrain recorded them): "
                        "a lost item is caught only where Orbax's %s lists it", root / str(step),
                        checkpoint_items.ORBAX_METADATA)
        position = _read_position(saved_position, manager, root, step, data_fingerprint)
        allow = bool(current["arguments"].get("allow_data_order_change"))
        moved = moved_data(stored_args, current["arguments"]) if content_compared else []
        across = content_compared and None in moved_paths(stored_args, current["arguments"]).values()
        keep_position = not data_order_changed and check_data_position(position, data_fingerprint, allow, moved,
                                                                       across)
        try:
            if stored_scan_layers(run_info) in (None, current["arguments"].get("scan_layers")):
                state = manager.restore_state(step, abstract_state=target)
            else:
                state = restore_in_other_layout(manager, step, target)
            check_restored_step(state, step, saved_updates)
        except CheckpointMismatchError:
            raise
        except Exception as error:
            if is_structure_mismatch(error):
                raise CheckpointStructureError(root / str(step), str(innermost(error))) from error
            raise resume_read_error(root, step, manager.all_steps(), error) from error
    warn_changes(run_info, current, content_compared)  # only now: every refusal check passed
    if moved and keep_position:
        logger.info("the training data moved (%s) and holds the checkpoint's rows (their count and content digest): "
                    "the run continues exactly from the saved data position", "; ".join(moved))
    logger.info("resumed from %s at step %d", root / str(step), step)
    return Restored(state, position if keep_position else None, progress.get("callbacks", {}))


def _position_or_error(manager: CheckpointManager, step: int) -> dict[str, Any] | Exception:
    """The checkpoint's data position, or the error reading it, which `_read_position` raises naming the checkpoint
    (after the checks that refuse a resume for what it changed)."""
    try:
        return manager.read_data_state(step)
    except Exception as error:  # any reason: raised by `_read_position`
        return error


def compares_content(position: Mapping[str, Any] | Exception, fingerprint: Mapping[str, Any] | None) -> bool:
    """Whether the checkpoint's data position and this run's loader both record the rows' digest, so that
    `check_data_position` compares the data's content and a local file moved to another path is not refused for its
    path (`resume_checks.moved_data`). A position that could not be read counts as one that does: `_read_position`
    then refuses the checkpoint as unreadable, not the moved path."""
    if fingerprint is None or DIGEST_KEY not in fingerprint:
        return False
    return isinstance(position, Exception) or DIGEST_KEY in position


def is_structure_mismatch(error: BaseException) -> bool:
    """Whether Orbax refused `error`'s restore for a state tree of other nodes than the checkpoint's, with the same
    arrays (`check_signatures` compares those first): empty nodes, such as an optimizer's stateless steps, count.
    The checkpoint is sound; the run builds another state."""
    reason = innermost(error)
    return isinstance(reason, ValueError) and "tree structures do not match" in str(reason)


def _read_position(position: dict[str, Any] | Exception, manager: CheckpointManager, root: Path, step: int,
                   fingerprint: Mapping[str, Any] | None) -> dict[str, Any]:
    """The checkpoint's data position (JSON only: `_position_or_error`); one without the settings the loader
    compares, or of another step than the checkpoint's (it would feed batches twice, or skip some), is damaged. A
    loader of the trainer's own (no `fingerprint`) keeps a position of its own making, not compared here."""
    try:
        if isinstance(position, Exception):
            raise position
        if fingerprint is not None:
            if missing := [key for key in ("step", *fingerprint) if key not in position and key != DIGEST_KEY]:
                raise ValueError(f"its data_state records no {', '.join(missing)}")
            check_position_step(position["step"], step)
    except Exception as error:
        raise resume_read_error(root, step, manager.all_steps(), error) from error
    return position


def check_position_step(saved: Any, step: int) -> None:
    """A data position saved in checkpoint `step` is that step's: another one is an edited or damaged data_state."""
    if type(saved) is not int or saved != step:
        raise ValueError(f"its data_state records step {saved!r}, but this is the checkpoint of step {step}: resumed, "
                         "the data would repeat or skip batches")


def check_restored_step(state: Any, step: int, saved_updates: int | None = None) -> None:
    """The restored train state must be checkpoint `step`'s, not a renamed or mixed-up step directory's. Its own step
    counts optimizer updates (several per loop step where `train_iteration` runs more): it must be the count recorded
    when `step` was saved (`CheckpointManager.read_saved_updates`). A checkpoint without that record (written before
    it) holds at least one update per step: fewer is another step's state (a renamed directory is caught before,
    by its data position's step: `check_position_step`)."""
    restored = getattr(state, "step", None)
    if restored is None:
        return
    if saved_updates is not None and int(restored) != saved_updates:
        raise ValueError(f"its train state is at update {int(restored)}, but checkpoint {step} was saved at update "
                         f"{saved_updates}")
    if saved_updates is None and int(restored) < step:
        raise ValueError(f"its train state is at step {int(restored)}, but this is the checkpoint of step {step}")


def restore_in_other_layout(manager: CheckpointManager, step: int, target: Any) -> Any:
    """A checkpoint written with the other `scan_layers` setting, restored in its own layout (stacked decoder
    layers, `layers.stacked.*`, or separate ones, `layers.0.*`) and converted to `target`'s: every array of the
    state (parameters, optimizer moments, module state) keeps its values. The conversion holds the restored and
    the converted copy of the state at once."""
    def stacked_groups(names: Any) -> set[str]:  # dotted paths of the StackedLayers nodes, e.g. `params.layers`
        return {name.split(f".{STACKED}.")[0] for name in names if f".{STACKED}." in name}

    now = stacked_groups(tree_signature(target))
    if now:
        stored_target = unstack_layer_dicts(target, lambda leaf, _: abstract_layer(leaf))
    else:
        stored = stacked_groups(manager.stored_signature(step))
        stored_target = stack_layer_dicts(target, lambda path: path_name(path) in stored, abstract_stack)
    state = manager.restore_state(step, abstract_state=stored_target)
    if now:
        state = stack_layer_dicts(state, lambda path: path_name(path) in now)
    else:
        state = unstack_layer_dicts(state)
    logger.info("converted the checkpoint's decoder layers to this run's scan_layers layout")
    return jax.device_put(state, jax.tree.map(lambda leaf: leaf.sharding, target))


def restore_step(manager: CheckpointManager, shardings: Any, step: int, current: Any) -> Any:
    """The state of checkpoint `step` in `current`'s layout, keeping the frozen entries that are rebuilt
    rather than checkpointed (`load_best_model_at_end`)."""
    target = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), current, shardings)
    restored = manager.restore_state(step, abstract_state=target.checkpointed())
    return restored.replace(frozen={**current.frozen, **restored.frozen}, base=current.base)
