"""What a checkpoint holds, checked against this run before any array is read: its step against the run's length,
the LoRA layout an older easytrain wrote (an adapter on a head trained in full), the `scan_layers` it was written
with, and the fixed frozen entries it trained against (`check_frozen_entries`)."""

from __future__ import annotations

from collections.abc import Collection, Mapping
from pathlib import Path
from typing import Any

from easytrain.checkpoint_dirs import finalized_steps
from easytrain.checkpoint_items import READ_ERRORS, stored_run_info
from easytrain.checkpoint_read_errors import resume_read_error
from easytrain.errors import ArgumentError
from easytrain.listing import listed
from easytrain.lora_config import EMBEDDING_MODULES

#: The run_info key of the digests of each frozen entry rebuilt on resume: entry -> dotted path -> two digests.
FROZEN_FINGERPRINTS = "frozen_fingerprints"


def stored_record(resume_from: tuple[Path, int] | None, key: str) -> dict[str, Any]:
    """The `key` entry of the resumed checkpoint's run_info (its JSON only: no array read); empty when not resuming,
    or not recorded (a checkpoint written before it was kept), which the checks comparing it take as nothing to
    compare.

    Raises:
        CheckpointReadError: the run_info cannot be read, or the entry is no JSON object: refused as the restore
            would refuse it, before the checks that compare it decide anything (read as empty, they would pass, and
            in a multi-process run a process that met a read error would take another branch than the others).
    """
    if resume_from is None:
        return {}
    root, step = resume_from
    try:
        return recorded_entry(stored_run_info(root / str(step)), key)
    except READ_ERRORS as error:
        raise resume_read_error(root, step, finalized_steps(root), error) from error


def recorded_entry(run_info: Mapping[str, Any], key: str) -> dict[str, Any]:
    """The `key` entry of `run_info`; empty where it records none (absent, or null).

    Raises:
        ValueError: the entry is not a JSON object (a damaged or edited run_info).
    """
    entry = run_info.get(key)
    if entry is None:
        return {}
    if not isinstance(entry, Mapping):
        raise ValueError(f"its run_info's {key} is not a JSON object (it holds a {type(entry).__name__})")
    return dict(entry)


def check_run_info_readable(resume_from: tuple[Path, int] | None) -> None:
    """Refuse a resumed checkpoint whose run_info cannot be read (`stored_record`) when the trainer is built: the
    restore would refuse it too, but only after the data was prepared and the model built (a LoRA base read, a DPO
    reference's log-probs computed and cached). One JSON file read."""
    stored_record(resume_from, "arguments")


def check_run_length(total_steps: int, step: int) -> None:
    """Before training from a checkpoint: a run that ends (`max_steps`, `num_train_epochs`) before the checkpoint's
    step has nothing to train, and would log step 4 of 2. Evaluating that checkpoint is fine."""
    if total_steps < step:
        raise ArgumentError("max_steps", f"{total_steps} is below the checkpoint's step {step}: the resumed run would "
                            f"have nothing to train. Pass --max_steps above {step} to train on, or start a new run "
                            "(in another --output_dir) to train for fewer steps.")


def may_hold_head_adapter(stored_args: dict[str, Any]) -> bool:
    """Whether the checkpoint's arguments allow `check_head_adapter_layout`'s old layout (adapters with
    lora_train_embeddings): only then are its state's keys read to check."""
    return bool((stored_args.get("lora_rank") or stored_args.get("lora_adapter_path"))
                and stored_args.get("lora_train_embeddings"))


def check_head_adapter_layout(stored_args: dict[str, Any], stored_keys: Collection[str]) -> None:
    """Refuse a LoRA checkpoint whose trained-in-full embedding or head also holds an adapter: easytrain wrote that
    layout before a head that `lora_train_embeddings` trains takes no adapter (PEFT's `modules_to_save` wins over
    `target_modules`), and this run's state has no place for it. `stored_keys`: the checkpoint's dotted state keys."""
    parts = [key.split(".") for key in stored_keys]
    adapted = sorted({".".join(path[1:-1]) for path in parts if len(path) > 2 and path[0] == "params"
                      and path[-2] in EMBEDDING_MODULES and path[-1].startswith("lora_")})
    if not adapted or not may_hold_head_adapter(stored_args):
        return
    raise ArgumentError("lora_target_modules", f"the checkpoint's run adapted {', '.join(adapted)} (named in "
                        f"lora_target_modules {stored_args.get('lora_target_modules')!r}) while lora_train_embeddings "
                        "trained it in full, a layout this easytrain no longer builds: a head that "
                        "lora_train_embeddings trains takes no adapter now, as PEFT's modules_to_save, so the "
                        "checkpoint's adapter on it has no place in the state (whatever lora_target_modules says). It "
                        "cannot be resumed here: finish the run with the easytrain release that wrote it, or start a "
                        "new output_dir from its weights: --model_name_or_path on its merged export (final_model/, "
                        "the head's adapter folded in) with the same lora_* arguments, or --init_weights_from this "
                        "checkpoint without --lora_train_embeddings (every adapter, the head's included, fits; the "
                        "embeddings and head then stay at their trained values) on the base it was trained from.")


def stored_scan_layers(run_info: dict[str, Any]) -> bool | None:
    """The `scan_layers` the checkpoint was written with; None where its arguments do not record one."""
    return (run_info.get("arguments") or {}).get("scan_layers")


def check_frozen_entries(run_info: dict[str, Any], current: dict[str, Any]) -> None:
    """Refuse a resume whose fixed frozen entries (`Frozen(..., checkpoint=False)`: rebuilt from their source, not
    restored) hold other values than the ones the checkpoint's run trained against, by their digests
    (`FROZEN_FINGERPRINTS`): a teacher folder overwritten since, or a builder that now draws other values, would
    otherwise bend every later step without a word. An entry one side does not record (a checkpoint written before
    they were recorded, an entry declared `fingerprint=False` or added since) is not compared."""
    stored, now = run_info.get(FROZEN_FINGERPRINTS) or {}, current.get(FROZEN_FINGERPRINTS) or {}
    for name in sorted(stored.keys() & now.keys()):
        if problem := _entry_difference(stored[name], now[name]):
            raise ArgumentError("resume_from_checkpoint", f"frozen entry '{name}' (checkpoint=False: rebuilt from its "
                                f"source on resume, not restored) holds other values than the checkpoint's run "
                                f"trained against: {problem}. Its source changed since that run started (a folder "
                                "overwritten, a builder that now builds other values). Restore the source the run "
                                "started from to resume; or start a new output_dir (--init_weights_from the "
                                "checkpoint keeps its trained weights) to train on against the new one; or, for an "
                                "entry meant to differ between starts, declare it Frozen(..., fingerprint=False).")


def _entry_difference(stored: dict[str, Any], now: dict[str, Any]) -> str:
    """Which tensors of an entry differ from the checkpoint's record, in words; empty when none does."""
    if changed := sorted(path for path in stored.keys() & now.keys() if list(stored[path]) != list(now[path])):
        return f"{len(changed)} tensor(s) differ: {listed(changed, 5)}"
    gone, added = sorted(stored.keys() - now.keys()), sorted(now.keys() - stored.keys())
    return "; ".join(f"{len(paths)} tensor(s) {where}: {listed(paths, 5)}" for paths, where in (
        (gone, "the checkpoint's run had are gone"), (added, "are new")) if paths)
