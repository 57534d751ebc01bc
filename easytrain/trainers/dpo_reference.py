"""The reference side of preference training: which model, and log-probabilities computed ahead of time.

`update_then_sync` moves a TR-DPO reference toward the policy inside the train step. `with_values` runs the
policy's own weights with other values for some variables: under LoRA from a trained adapter
(`lora_adapter_path`) or from another run's weights (`init_weights_from`), the reference is the base with a copy
of the adapter values the policy started from.

A run started with `init_weights_from` has those weights in its initial policy, so its reference gets them too
(`with_initial_weights`), and a resume, which rebuilds a fixed reference from that source rather than reading it
from the checkpoint, must find the same weights there: `require_source` and `check_initial_policy` refuse a
source gone or changed, against the digests the run recorded in its run_info (`INITIAL_POLICY`). A fixed
reference read from a path (`model_name_or_path`'s weights, or `ref_model_name_or_path`) is rebuilt from it on
resume too: `checked_reference_weights` records its digests and its config's architecture (`REFERENCE_WEIGHTS`)
and refuses other weights, or another config, there,
as `checked_adapter_values` does for the adapter a LoRA reference reads from `lora_adapter_path` (`LORA_ADAPTER`).
These records and checks serve every `BaseTrainer.initial_policy()` (`easytrain.trainers.initial_policy`), DPO's
reference being one; `subject` names in their messages what the initial policy is used as.

`precomputed_reference_logps` runs the reference model over every pair once, in one compiled pass,
before training, and caches the result on disk under a key made of the pairs' content (`pairs_digest`), the
reference weights' fingerprints and what the weights do not show: its architecture (`dpo_architecture.architecture_key`:
the config's RoPE theta, norm epsilon, ..., the attention kernel) and its adapters' scaling; a second run (or a resumed
one) with the same pairs and reference reads the cache instead of recomputing, and the reference's parameters are
released before training starts.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
import optax
import transformers
from flax import nnx, traverse_util

from easytrain import integrity, lora, placement, sharding
from easytrain.data import EvalBatches, RowSource
from easytrain.data.digest import rows_digest
from easytrain.errors import ArgumentError
from easytrain.frozen import Frozen, digests_as_recorded, place_frozen
from easytrain.models.families import ConfigError, check_buildable
from easytrain.models.scan import STACKED, stack_layer_dicts, unstack_layer_dicts
from easytrain.protocol import ConfiguredModel
from easytrain.trainers import builders
from easytrain.trainers.dpo_architecture import (ARCHITECTURE, architecture_changes, architecture_key,
                                                 config_architecture)
from easytrain.trainers.init_weights import float_leaves, resolved_source
from easytrain.trainers.restore_checks import stored_record
from easytrain.trainers.lora_record import LORA_CONFIG_KEY, config_changes, config_record, described

logger = logging.getLogger("easytrain")
CACHE_DIRNAME = "reference_logps"
#: `state.frozen` entry of the trainable values a LoRA run started from (`lora_adapter_path`'s adapter as loaded,
#: or `init_weights_from`'s adapters).
INITIAL_ADAPTERS = "initial_adapters"
#: run_info entry of a run started with `init_weights_from`: the source, the checkpoint it named then, and the digests
#: of the initial policy's trained variables its reference was built from (`check_initial_policy`).
INITIAL_POLICY = "initial_policy"
#: run_info entry of a fixed reference read from a path: the path read and the digests of its weights.
REFERENCE_WEIGHTS = "reference_weights"
#: run_info entry of a run whose reference reads `lora_adapter_path` (again on resume): the path read and the digests
#: of the adapter values it gave (`checked_adapter_values`).
LORA_ADAPTER = "lora_adapter"
#: How a message names a DPO run's initial policy (`subject`): its reference.
DPO_REFERENCE = "DPO reference"


def with_values(module: nnx.Module, selected: nnx.filterlib.Filter, values: Any) -> nnx.Module:
    """A module of `module`'s graph and variables, except those `selected` takes from `values` (a pure dict), in
    eval mode; `module` is left as it is (also inside a traced step)."""
    graphdef, _, rest = nnx.split(module, selected, ...)
    out = nnx.merge(graphdef, values, nnx.to_pure_dict(rest))
    out.eval()
    return out


def check_reference_path(path: str) -> None:
    """A local path must exist (it may be a checkpoint, resolved when the reference loads); a hub id must
    resolve, which its config (one small file, from the cache when offline) shows. A config the model cannot
    build is refused now, as the policy's is, not after the data was prepared."""
    local = Path(path).expanduser()
    if local.exists() and not (local / "config.json").is_file():
        return
    config = builders.load_pretrained("ref_model_name_or_path", path, transformers.AutoConfig.from_pretrained,
                                      "the reference model's config", "Pass a local model directory or "
                                      "checkpoint, or the id of a hub model.")
    try:
        check_buildable(config)
    except ConfigError as error:
        raise ArgumentError("ref_model_name_or_path",
                            f"the model config of {path!r} cannot be a reference: {error}") from error


def with_initial_weights(module: nnx.Module, initial_weights: Callable[[Any, Any], Any], *, source: str,
                         resume_from: tuple[Path, int] | None, seed: int, mesh: jax.sharding.Mesh,
                         rules: sharding.LogicalRules, filters: Mapping[str, nnx.filterlib.Filter],
                         subject: str = DPO_REFERENCE) -> tuple[nnx.Module, dict[str, Any]]:
    """`module` (built and laid out as the policy is) with `init_weights_from`'s weights put in as the policy's are,
    on a train state of it split by the policy's `filters` (`checked_initial_weights`): the same values the policy
    starts from, whatever the source holds or lacks; and the run_info record of them."""
    state, shardings = placement.place_module(module, optax.identity(), seed=seed, mesh=mesh, rules=rules,
                                              copy=False, **filters)
    state, record = checked_initial_weights(initial_weights, state, shardings, source=source, resume_from=resume_from,
                                            subject=subject)
    return state.model(), record


def checked_initial_weights(initial_weights: Callable[[Any, Any], Any], state: Any, shardings: Any, *, source: str,
                            resume_from: tuple[Path, int] | None, subject: str = DPO_REFERENCE
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


def with_initial_adapters(configured: ConfiguredModel, values: Any) -> ConfiguredModel:
    """`configured` with a copy of `values`, the adapter values the policy starts from, in `state.frozen`
    (`INITIAL_ADAPTERS`; not checkpointed: small, and read again on resume, checked by `checked_adapter_values` or
    `check_initial_policy`), sharded like the adapters."""
    state, shardings = configured.state, configured.state_shardings
    copy = jax.device_put(values, shardings.params, may_alias=False)  # the step donates params
    return configured._replace(state=state.replace(frozen={**state.frozen, INITIAL_ADAPTERS: copy}),
                               state_shardings=shardings.replace(
                                   frozen={**shardings.frozen, INITIAL_ADAPTERS: shardings.params}))


def require_source(source: str, *, resuming: bool, subject: str = DPO_REFERENCE) -> None:
    """A resume reads `init_weights_from` again to rebuild the initial policy: say so when it is gone."""
    if resuming and not Path(source).expanduser().exists():
        raise ArgumentError("init_weights_from", f"{source} no longer exists. This resumed run's {subject} is its "
                                                 "initial policy, rebuilt from the weights read there at its start (a "
                                                 "fixed reference is not checkpointed). Put the same weights back at "
                                                 "that path (they are checked against the digests the checkpoint "
                                                 "recorded), or start a new output_dir.")


def check_initial_policy(resume_from: tuple[Path, int] | None, record: Mapping[str, Any],
                         weights: Mapping[str, Any] | None = None, *, subject: str = DPO_REFERENCE) -> None:
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
                              resume_from: tuple[Path, int] | None, subject: str = DPO_REFERENCE) -> dict[str, Any]:
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
                           resume_from: tuple[Path, int] | None, subject: str = DPO_REFERENCE) -> dict[str, Any]:
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
    return f"{len(changed)} tensor(s): " + ", ".join(changed[:5]) + (
        f" and {len(changed) - 5} more" if len(changed) > 5 else "")


def adapter_scalings(value: Any) -> list[float]:
    """The distinct LoRA scalings of a reference module's adapters (none for another value): a cache key part."""
    return sorted({module.scaling for module in lora.lora_modules(value).values()}) if isinstance(
        value, nnx.Module) else []


def pairs_digest(rows: RowSource) -> str:
    """The content digest of the tokenised pairs the reference pass reads, in row order (`data.digest.rows_digest`):
    the cache key's data part. Not the rows' `datasets` fingerprint, which for a local file is its path and
    modification time, so a file rewritten keeping them (cp -p, rsync -t) would read the old pairs' log-probs."""
    return rows_digest(rows)


def cache_key(data_digest: str, reference_digests: Mapping[str, Any], settings: Mapping[str, Any]) -> str:
    """A name for one (pairs, reference weights, tokenisation settings) combination."""
    payload = json.dumps({"pairs": data_digest, "reference": reference_digests, "settings": settings},
                         sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:24]


def precomputed_reference_logps(reference: Frozen, rows: RowSource, *, settings: Mapping[str, Any],
                                collate: Callable, batch_size: int,
                                sequence_logps: Callable[[nnx.Module, Mapping[str, jax.Array]], jax.Array],
                                mesh: jax.sharding.Mesh, rules: sharding.LogicalRules, cache_dir: Path,
                                is_main_process: bool, compiler_options: Mapping[str, Any] | None = None
                                ) -> tuple[np.ndarray, bool]:
    """`[num_pairs, 2]` reference log-probs of (chosen, rejected) for every row, and whether they were
    read from the cache, keyed on `rows`' content. The reference lives on the mesh only inside this function."""
    if scalings := adapter_scalings(reference.value):  # not in the tensors' digests: another lora_alpha, same tensors
        settings = {**settings, "lora_scalings": scalings}
    placed = place_frozen({"reference": reference}, mesh, rules)
    values, graphdef = placed.values["reference"], dict(placed.modules)["reference"]
    settings = {**settings, ARCHITECTURE: architecture_key(graphdef, reference.value)}  # not in the weights either
    key = cache_key(pairs_digest(rows), integrity.fingerprint(values, integrity.SMALL_ON_HOST), settings)
    path = cache_dir / f"{key}.npy"
    if path.is_file():
        logger.info("reference log-probs read from %s", path)
        return np.load(path), True
    batch_sh = sharding.batch_sharding(mesh)

    def pass_(reference_values: Any, batch: Mapping[str, jax.Array]) -> jax.Array:
        module = nnx.merge(graphdef, reference_values)
        module.eval()
        return sequence_logps(module, batch)

    compiled = jax.jit(sharding.with_activation_layout(pass_, mesh, rules),
                       in_shardings=(placed.shardings["reference"], batch_sh), out_shardings=batch_sh,
                       compiler_options=compiler_options)
    num_rows = len(rows["example_id"]) if isinstance(rows, Mapping) and "example_id" in rows else len(rows)
    result = np.zeros((num_rows, 2), np.float32)
    loader = EvalBatches(rows, batch_size, collate=collate, process_index=jax.process_index(),
                         process_count=jax.process_count(), multiple_of=sharding.data_parallel_size(mesh))
    for batch in loader:
        ids = batch.pop("example_id")
        device_batch = sharding.to_global_arrays(batch, batch_sh)
        logps = np.asarray(jax.experimental.multihost_utils.process_allgather(compiled(values, device_batch),
                                                                               tiled=True))
        all_ids = np.asarray(jax.experimental.multihost_utils.process_allgather(jnp.asarray(ids), tiled=True))
        real = all_ids >= 0
        result[all_ids[real]] = logps[real]
    del values, placed  # the reference leaves device memory before training
    if is_main_process:
        cache_dir.mkdir(parents=True, exist_ok=True)
        temporary = path.with_suffix(".tmp.npy")
        np.save(temporary, result)
        temporary.replace(path)  # atomic: a killed run never leaves a half-written cache
    logger.info("reference log-probs computed for %d pairs and cached in %s", num_rows, path)
    return result, False


def update_then_sync(state: Any, batch: Mapping[str, jax.Array], *, update: Callable[..., Any], alpha: float,
                     every: int) -> tuple[Any, dict]:
    """One update, then TR-DPO's reference sync (`sync_reference`) when the update count reaches a multiple of
    `every`; inside the train step, so a checkpoint of step N holds the reference of step N."""
    state, metrics = update(state, batch)
    return sync_reference(state, alpha=alpha, every=every), metrics


def sync_reference(state: Any, *, alpha: float, every: int) -> Any:
    """TR-DPO (Gorbatovski et al. 2024): after every `every`-th update, reference <- alpha * policy +
    (1 - alpha) * reference, on the trained variables the two share. A branch, not a select: the other steps
    neither read nor write the reference."""
    reference = traverse_util.flatten_dict(state.frozen["reference"])
    policy = traverse_util.flatten_dict(state.params)

    def mixed() -> dict:
        out = dict(reference)
        for key, value in policy.items():
            out[key] = (alpha * value.astype(jnp.float32)
                        + (1 - alpha) * reference[key].astype(jnp.float32)).astype(reference[key].dtype)
        return out

    new = jax.lax.cond(state.step % every == 0, mixed, lambda: dict(reference))
    return state.replace(frozen={**state.frozen, "reference": traverse_util.unflatten_dict(new)})
