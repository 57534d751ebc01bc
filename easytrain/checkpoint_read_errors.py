"""How a checkpoint that cannot be read is refused: one `CheckpointReadError` wording for every reader (a resume,
`init_weights_from`, `CheckpointManager.restore`), naming the checkpoint, the reader's own reason (the file that is
not valid JSON, where the decoder names only a position in it) and what to do instead. Kept below the trainers, so
that the readers of single run_info records (`restore_checks`, `lora_record`) and the readers of whole checkpoints
(`resume`, `init_weights`) share it without importing each other."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

from easytrain.checkpoint_dirs import finalized_steps
from easytrain.checkpoint_items import MissingItemError
from easytrain.errors import CheckpointReadError

# The JSON files orbax writes next to the arrays; the arrays themselves live under `d/` and `*.ocdbt`.
_JSON_METADATA = ("_METADATA", "_CHECKPOINT_METADATA", "_sharding", "metadata")
#: A reason longer than this is cut (an Orbax error may print a whole TensorStore spec); our own are kept whole.
_DETAIL_CHARS = 300


def read_error(reader: str, step_dir: Path, error: BaseException, hint: str) -> CheckpointReadError:
    """`step_dir` cannot be read, as `reader` (the argument or method that read it) says so: the innermost reason's
    first line (with the file, for bad JSON), and `hint`, what to pass or do instead."""
    reason = innermost(error)
    lines = str(reason).strip().splitlines()
    detail = lines[0] if lines else ""
    if not isinstance(reason, MissingItemError) and len(detail) > _DETAIL_CHARS:  # ours: the step, item and fix
        detail = detail[:_DETAIL_CHARS] + " ..."
    if isinstance(reason, json.JSONDecodeError) and (bad := first_invalid_json(step_dir)) is not None:
        detail = f"{bad} is not valid JSON: {detail}"
    denied = isinstance(reason, PermissionError)
    cause = ("this process may not read it: check the files' permissions and owner" if denied
             else "it may be corrupted or truncated")
    return CheckpointReadError(f"{reader}: the checkpoint {step_dir} cannot be read ({type(reason).__name__}: "
                               f"{detail}); {cause}. It was left untouched; {hint}.")


def resume_read_error(root: Path, step: int, steps: list[int], error: BaseException) -> CheckpointReadError:
    """A resumed checkpoint that cannot be read. `steps`: the complete checkpoints there now. One gone since it was
    chosen was likely removed by a run still writing there (its save_total_limit), which also makes newer ones: name
    those rather than advise a new run."""
    return _step_read_error("resume_from_checkpoint", root, step, steps, error, verb="Resume from",
                            earlier=lambda path: f"resume from an earlier one, e.g. --resume_from_checkpoint {path}",
                            no_earlier="no earlier checkpoint exists; start a new output_dir")


def source_read_error(root: Path, step: int, error: BaseException) -> CheckpointReadError:
    """An `init_weights_from` checkpoint that cannot be read, with an earlier step or the run's export to pass; one
    gone meanwhile (its run trains on) as `vanished_error`."""
    export = root.parent / "final_model"
    also = f", or the run's exported model, --init_weights_from {export}" if (export / "config.json").is_file() else ""
    return _step_read_error("init_weights_from", root, step, finalized_steps(root), error, verb="Pass",
                            earlier=lambda path: f"pass an earlier one, e.g. --init_weights_from {path}",
                            no_earlier="no earlier checkpoint exists", also=also)


def restore_read_error(root: Path, step: int, steps: list[int], error: BaseException) -> CheckpointReadError:
    """A step `CheckpointManager.restore` cannot read (`steps`: the checkpoints there), with an earlier one; one
    gone meanwhile (a read-only manager beside a run that trains on) as `vanished_error`."""
    return _step_read_error("CheckpointManager.restore", root, step, steps, error, verb="Restore",
                            earlier=lambda path: f"restore an earlier one, e.g. step {path.name}",
                            no_earlier="no earlier checkpoint exists")


def _step_read_error(reader: str, root: Path, step: int, steps: list[int], error: BaseException, *, verb: str,
                     earlier: Callable[[Path], str], no_earlier: str, also: str = "") -> CheckpointReadError:
    """Step `step` of `root` that `reader` cannot read: `vanished_error` if it is no longer among `steps`, else
    `read_error` with the hint `earlier(<the newest earlier step's directory>)` (`no_earlier` where there is none),
    then `also`."""
    if step not in steps:
        return vanished_error(reader, root, step, steps, verb)
    before = [s for s in steps if s < step]
    hint = (earlier(root / str(before[-1])) if before else no_earlier) + also
    return read_error(reader, root / str(step), error, hint)


def vanished_error(reader: str, root: Path, step: int, steps: list[int], verb: str) -> CheckpointReadError:
    """`step` of `root` gone while `reader` read it: likely removed by a run still writing there (its
    save_total_limit), which also makes newer ones, so name the `steps` there now rather than call it damaged."""
    return CheckpointReadError(
        f"{reader}: the checkpoint {root / str(step)} vanished while it was read (likely removed by a run still "
        f"writing there, under its save_total_limit); checkpoints there now: {', '.join(map(str, steps)) or 'none'}. "
        f"{verb} one of them once that run ended (or a copy made now: it may remove those too).")


def first_invalid_json(step_dir: Path) -> Path | None:
    """The first of the checkpoint's JSON metadata files that does not parse, if any."""
    candidates = [path for path in sorted(step_dir.rglob("*")) if path.is_file()
                  and (path.name in _JSON_METADATA or path.parent.name == "array_metadatas")]
    for path in candidates:
        try:
            json.loads(path.read_bytes())
        except (json.JSONDecodeError, UnicodeDecodeError):
            return path
    return None


def innermost(error: BaseException) -> BaseException:
    """The exception at the bottom of `error`'s chain: the reader's own reason (which file, which bytes), where
    orbax wraps it in a generic one that prints a TensorStore spec."""
    seen = {id(error)}
    while (inner := _raised_from(error)) is not None and id(inner) not in seen:
        seen.add(id(inner))
        error = inner
    return error


def _raised_from(error: BaseException) -> BaseException | None:
    """The exception `error` was raised from, or while handling; none past one raised `from None` (a JSON
    decoder's reason would otherwise read as the `StopIteration` it replaced)."""
    return error.__cause__ or (None if error.__suppress_context__ else error.__context__)
