"""The records and checks of the sources an initial policy is read from (`BaseTrainer.initial_policy()`,
`easytrain.trainers.initial_policy`, DPO's reference being one): a fixed one is rebuilt from them on resume, not
checkpointed, so a resume must find the same values there.

A run started with `init_weights_from` has those weights in its initial policy (`with_initial_weights`), and a resume,
which rebuilds it from that source rather than reading it from the checkpoint, must find the same weights there:
`require_source` and `check_initial_policy` refuse a source gone or changed, against the digests the run recorded in
its run_info (`INITIAL_POLICY`). One read from a path (`model_name_or_path`'s weights, or DPO's
`ref_model_name_or_path`) is rebuilt from it on resume too: `checked_reference_weights` records its digests and its
config's architecture (`REFERENCE_WEIGHTS`) and refuses other weights, or another config, there, as
`checked_adapter_values` does for the adapter a LoRA initial policy reads from `lora_adapter_path` (`LORA_ADAPTER`).
`subject` names in their messages what the initial policy is used as (DPO: its reference).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Callable, Mapping

import jax
import optax
from flax import nnx

from easytrain import integrity, placement, sharding
from easytrain.errors import ArgumentError
from easytrain.frozen import digests_as_recorded
from easytrain.listing import listed
from easytrain.models.scan import STACKED, stack_layer_dicts, unstack_layer_dicts
from easytrain.trainers.dpo_architecture import ARCHITECTURE, architecture_changes, config_architecture
from easytrain.trainers.init_weights import float_leaves, resolved_source
from easytrain.trainers.lora_record import LORA_CONFIG_KEY, config_changes, config_record, described
from easytrain.trainers.restore_checks import stored_record

#: run_info entry of a run started with `init_weights_from`: the source, the checkpoint it named then, and the digests
#: of the initial policy's trained variables (`check_initial_policy`).
INITIAL_POLICY = "initial_policy"
#: run_info entry of a fixed initial policy read from a path: the path read and the digests of its weights.
REFERENCE_WEIGHTS = "reference_weights"
#: run_info entry of a run whose initial policy reads `lora_adapter_path` (again on resume): the path read and the
#: digests of the adapter values it gave (`checked_adapter_values`).
LORA_ADAPTER = "lora_adapter"
#: How a message names the initial policy when its trainer says nothing else (`initial_policy_subject`).
FROZEN_REFERENCE = "frozen reference"


def with_initial_weights(module: nnx.Module, initial_weights: Callable[[Any, Any], Any], *, source: str,
                         resume_from: tuple[Path, int] | None, seed: int, mesh: jax.sharding.Mesh,
                         rules: sharding.LogicalRules, filters: Mapping[str, nnx.filterlib.Filter],
                         subject: str = FROZEN_REFERENCE) -> tuple[nnx.Module, dict[str, Any]]:
    """`module` (built and laid out as the policy is) with `init_weights_from`'s weights put in as the policy's are,
    on a train state of it split by the policy's `filters` (`checked_initial_weights`): the same values the policy
    starts from, whatever the source holds or lacks; and the run_info record of them."""
    state, shardings = placement.place_module(module, optax.identity(), seed=seed, mesh=mesh, rules=rules,
                                              copy=False, **filters)
    state, record = checked_initial_weights(initial_weights, state, shardings, source=source, resume_from=resume_from,
                                            subject=subject)
    return state.model(), record


def checked_initial_weights(initial_weights: Callable[[Any, Any], Any], state: Any, shardings: Any, *, source: str,
                            resume_from: tuple[Path, int] | None, subject: str = FROZEN_REFERENCE
                            ) -> tuple[Any, dict[str, Any]]:
    """`initial_weights(state, shardings)` (the trainer's `_initial_weights`: `source`'s weights put in) and its
    run_info record (`INITIAL_POLICY`: the digests of the trained variables it gave); a resume reads the source
    again, so it must still be there (`require_source`) with the same values (`check_initial_policy`). A LoRA base
    is not digested here: `base_fingerprint` already checks it on resume."""
    require_source(source, resuming=resume_from is not None, subject=subject)
    state = initial_weights(state, shardings)
    weights = float_leaves(state.params)
    record = {"init_weights_from": source, "read_from": resolved_source(source),
              "fingerprint": integrity.fingerprint(weights, integrity.SMALL_ON_HOST)}
    check_initial_policy(resume_from, record, weights, subject=subject)
    return state, record


def require_source(source: str, *, resuming: bool, subject: str = FROZEN_REFERENCE) -> None:
    """A resume reads `init_weights_from` again to rebuild the initial policy: say so when it is gone."""
    if resuming and not Path(source).expanduser().exists():
        raise ArgumentError("init_weights_from", f"{source} no longer exists. This resumed run's {subject} is its "
                                                 "initial policy, rebuilt from the weights read there at its start (a "
                                                 "fixed reference is not checkpointed). Put the same weights back at "
                                                 "that path (they are checked against the digests the checkpoint "
                                                 "recorded), or start a new output_dir.")


def check_initial_policy(resume_from: tuple[Path, int] | None, record: Mapping[str, Any],
                         weights: Mapping[str, Any] | None = None, *, subject: str = FROZEN_REFERENCE) -> None:
    """On resume, refuse an initial policy whose weights differ from those the run started from (its checkpoint's
    run_info `INITIAL_POLICY`): the source may have changed since (e.g. the run it names trained on, so its
    latest checkpoint is another), and a reference of other weights would bend every later loss without a word.
    `weights` (the record's, by dotted path) let a record kept in the other `scan_layers` layout be compared."""
    stored = stored_record(resume_from, INITIAL_POLICY)
    digests = record["fingerprint"] if weights is None else digests_as_recorded(
        weights, record["fingerprint"], stored.get("fingerprint") or {})
    if changed := _changed(stored.get("fingerprint"), digests):
        raise ArgumentError("init_weights_from", f"the weights read from {record['read_from']} differ from those this "
                                                 f"run started from ({changed}); its {subject}, "
                                                 "the initial policy, is rebuilt from them on resume. Pass "
                                                 f"--init_weights_from {stored.get('read_from')} (where they were read "
                                                 "at the start), or start a new output_dir.")


def checked_reference_weights(module: nnx.Module, *, field: str, read_from: Path,
                              resume_from: tuple[Path, int] | None, subject: str = FROZEN_REFERENCE) -> dict[str, Any]:
    """The run_info record (`REFERENCE_WEIGHTS`) of a fixed reference read from `read_from` (`field`'s path): the
    digests of its weights and its config's architecture. A resume rebuilds it from there, so refuse other weights
    or another architecture found there now (the files were replaced or edited since the run started): they would
    bend every later loss without a word. A record without the architecture (an older checkpoint) checks weights."""
    weights = float_leaves(nnx.to_pure_dict(nnx.state(module)))
    digests = integrity.fingerprint(weights, integrity.SMALL_ON_HOST)
    record = {"read_from": str(read_from), "fingerprint": digests, ARCHITECTURE: config_architecture(module)}
    before = stored_record(resume_from, REFERENCE_WEIGHTS)
    if changes := architecture_changes(before.get(ARCHITECTURE), record[ARCHITECTURE]):
        raise ArgumentError(field, f"the reference model config read from {read_from} is not the one this run "
                                   f"started from ({'; '.join(changes)}): the same weights under it give other "
                                   f"log-probs, and a fixed {subject} is not checkpointed but rebuilt from "
                                   f"{field} on resume. Restore the config.json the run started from at "
                                   f"{read_from}, or start a new output_dir.")
    stored = before.get("fingerprint") or {}
    if changed := _changed(stored, digests_as_recorded(weights, digests, stored)):
        raise ArgumentError(field, f"the reference weights read from {read_from} differ from those this run started "
                                   f"from ({changed}); a fixed {subject} is not checkpointed but rebuilt from "
                                   f"{field} on resume. Put the weights the run started from back at {read_from}, "
                                   "or start a new output_dir.")
    return record


def checked_adapter_values(values: Any, *, adapter_path: str, config: Any,
                           resume_from: tuple[Path, int] | None, subject: str = FROZEN_REFERENCE) -> dict[str, Any]:
    """The run_info record (`LORA_ADAPTER`) of the adapter values read from `adapter_path` for the reference (the base
    with the adapter the run started from), digested per layer whatever scan_layers is. A resume reads the path
    again, so refuse other values found there now (another directory, or the same one re-written since): they would
    bend every later loss without a word. Its LoRA `config` (the `LoRAConfig` read from there) is recorded and compared
    too: another lora_alpha or use_rslora scales the same tensors into another reference."""
    record = {"read_from": str(Path(adapter_path).expanduser().absolute()),
              "fingerprint": _adapter_digests(unstack_layer_dicts(values)),
              LORA_CONFIG_KEY: config_record(config, adapter_path)}
    stored = stored_record(resume_from, LORA_ADAPTER)
    before, now = stored.get(LORA_CONFIG_KEY) or {}, record[LORA_CONFIG_KEY]
    if changes := config_changes(before, now):
        raise ArgumentError("lora_adapter_path", f"the adapter config read from {record['read_from']} is not the one "
                                                 f"this run started from, read from {stored.get('read_from')} "
                                                 f"({described(changes, before, now)}). The {subject} under LoRA "
                                                 "is the base with the adapter the run started from, as its config "
                                                 "scales it, read again from lora_adapter_path on resume. Restore that "
                                                 "adapter_config.json, or start a new output_dir.")
    digests = _adapter_digests(_in_layout_of(values, stored.get("fingerprint") or {}))
    if stored.get("fingerprint") in (None, digests):
        return record
    changed = _changed(stored["fingerprint"], digests) or "other tensors"
    raise ArgumentError("lora_adapter_path", f"the adapter read from {record['read_from']} (digest "
                                             f"{_digest(digests)}) is not the one this run started from, read from "
                                             f"{stored.get('read_from')} (digest {_digest(stored['fingerprint'])}; "
                                             f"{changed}). The {subject} under LoRA is the base with the adapter "
                                             "the run started from, read again from lora_adapter_path on resume (it "
                                             "is not checkpointed). Put that adapter back at "
                                             f"{stored.get('read_from')} and pass --lora_adapter_path "
                                             f"{stored.get('read_from')}, or start a new output_dir.")


def _adapter_digests(values: Any) -> dict[str, Any]:
    return integrity.fingerprint(float_leaves(values), integrity.SMALL_ON_HOST)


def _in_layout_of(values: Any, recorded: Mapping[str, Any]) -> Any:
    """`values` as `recorded`'s digests name them: per layer (whatever the layout, so a resume with the other
    scan_layers reaches its own refusal), or stacked where a record kept before that names `….stacked.…`."""
    marker = f".{STACKED}."
    stacked = {key.split(marker)[0] for key in recorded if marker in key}
    values = unstack_layer_dicts(values)
    if not stacked:
        return values
    return stack_layer_dicts(values, lambda path: jax.tree_util.keystr(path, simple=True, separator=".") in stacked)


def _digest(fingerprint: Mapping[str, Any]) -> str:
    """One short digest of a whole fingerprint, for a message."""
    return hashlib.sha256(json.dumps(fingerprint, sort_keys=True).encode()).hexdigest()[:16]


def _changed(expected: Mapping[str, Any] | None, digests: Mapping[str, Any]) -> str:
    """The tensors whose digests differ from the recorded ones, as an error shows them; empty when none do."""
    expected = expected or {}
    changed = sorted(path for path in expected.keys() & digests.keys() if expected[path] != digests[path])
    if not changed:
        return ""
    return f"{len(changed)} tensor(s): {listed(changed, 5)}"
