"""The reference side of preference training: which model, and log-probabilities computed ahead of time.

`update_then_sync` moves a TR-DPO reference toward the policy inside the train step. `with_values` runs the
policy's own weights with other values for some variables: under LoRA from a trained adapter
(`lora_adapter_path`) or from another run's weights (`init_weights_from`), the reference is the base with a copy
of the adapter values the policy started from.

A fixed reference is rebuilt from its sources on resume, not checkpointed: the records and checks that say so
(`init_weights_from`, a model path, `lora_adapter_path`) serve every `BaseTrainer.initial_policy()`, DPO's reference
being one, and live in `easytrain.trainers.initial_policy_checks`; `DPO_REFERENCE` names the reference in their
messages.

`precomputed_reference_logps` runs the reference model over every pair once, in one compiled pass,
before training, and caches the result on disk under a key made of the pairs' content (`pairs_digest`), the
reference weights' fingerprints and what the weights do not show: its architecture (`dpo_architecture.architecture_key`:
the config's RoPE theta, norm epsilon, ..., the attention kernel) and its adapters' scaling; a second run (or a resumed
one) with the same pairs and reference reads the cache instead of recomputing, and the reference's parameters are
released before training starts.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
from pathlib import Path
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
import transformers
from flax import nnx, traverse_util

from easytrain import lora, sharding
from easytrain.data import EvalBatches, RowSource
from easytrain.data.digest import rows_digest
from easytrain.errors import ArgumentError
from easytrain.frozen import Frozen, entry_digests, place_frozen
from easytrain.models.families import ConfigError, check_buildable
from easytrain.protocol import ConfiguredModel
from easytrain.trainers import builders
from easytrain.trainers.dpo_architecture import ARCHITECTURE, architecture_key

logger = logging.getLogger("easytrain")
CACHE_DIRNAME = "reference_logps"
#: `state.frozen` entry of the trainable values a LoRA run started from (`lora_adapter_path`'s adapter as loaded,
#: or `init_weights_from`'s adapters).
INITIAL_ADAPTERS = "initial_adapters"
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


def with_initial_adapters(configured: ConfiguredModel, values: Any) -> ConfiguredModel:
    """`configured` with a copy of `values`, the adapter values the policy starts from, in `state.frozen`
    (`INITIAL_ADAPTERS`; not checkpointed: small, and read again on resume, checked by `checked_adapter_values` or
    `check_initial_policy`), sharded like the adapters."""
    state, shardings = configured.state, configured.state_shardings
    copy = jax.device_put(values, shardings.params, may_alias=False)  # the step donates params
    return configured._replace(state=state.replace(frozen={**state.frozen, INITIAL_ADAPTERS: copy}),
                               state_shardings=shardings.replace(
                                   frozen={**shardings.frozen, INITIAL_ADAPTERS: shardings.params}))


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


def precomputed_reference_logps(reference: Frozen, splits: Mapping[str, RowSource], *, settings: Mapping[str, Any],
                                collate: Callable, batch_size: int,
                                sequence_logps: Callable[[nnx.Module, Mapping[str, jax.Array]], jax.Array],
                                mesh: jax.sharding.Mesh, rules: sharding.LogicalRules, cache_dir: Path,
                                is_main_process: bool, compiler_options: Mapping[str, Any] | None = None
                                ) -> dict[str, tuple[np.ndarray, bool]]:
    """Split name -> `[num_pairs, 2]` reference log-probs of (chosen, rejected) for every row of its pairs, and
    whether they were read from the cache, keyed on the rows' content. The reference is placed, digested and its
    pass compiled once for all splits; it lives on the mesh only inside this function."""
    if scalings := adapter_scalings(reference.value):  # not in the tensors' digests: another lora_alpha, same tensors
        settings = {**settings, "lora_scalings": scalings}
    placed = place_frozen({"reference": reference}, mesh, rules)
    values, graphdef = placed.values["reference"], dict(placed.modules)["reference"]
    settings = {**settings, ARCHITECTURE: architecture_key(graphdef, reference.value)}  # not in the weights either
    digests = entry_digests(reference, values)  # those its resume record took, where it has one
    batch_sh = sharding.batch_sharding(mesh)

    def pass_(reference_values: Any, batch: Mapping[str, jax.Array]) -> jax.Array:
        module = nnx.merge(graphdef, reference_values)
        module.eval()
        return sequence_logps(module, batch)

    compiled = jax.jit(sharding.with_activation_layout(pass_, mesh, rules),
                       in_shardings=(placed.shardings["reference"], batch_sh), out_shardings=batch_sh,
                       compiler_options=compiler_options)
    found = {}
    for name, rows in splits.items():
        path = cache_dir / f"{cache_key(pairs_digest(rows), digests, settings)}.npy"
        if seen_by_every_process(path.is_file()):
            logger.info("reference log-probs read from %s", path)
            found[name] = np.load(path), True
            continue
        found[name] = _logps_of(rows, functools.partial(compiled, values), batch_size=batch_size, collate=collate,
                                mesh=mesh), False
        if is_main_process:
            cache_dir.mkdir(parents=True, exist_ok=True)
            temporary = path.with_suffix(".tmp.npy")
            np.save(temporary, found[name][0])
            temporary.replace(path)  # atomic: a killed run never leaves a half-written cache
        logger.info("reference log-probs computed for %d pairs and cached in %s", len(found[name][0]), path)
    del values, placed  # the reference leaves device memory before training
    return found


def seen_by_every_process(found: bool, gather: Callable[[np.ndarray], np.ndarray] | None = None) -> bool:
    """Whether every process found the cache file: one that did not (a shared filesystem showing the main process's
    write late) would run the pass and wait forever in its gathers for processes that read the file instead, so
    all read it or all compute. `gather`: `multihost_utils.process_allgather` (one process: `found` itself)."""
    if gather is None:
        if jax.process_count() == 1:
            return found
        gather = jax.experimental.multihost_utils.process_allgather
    return bool(np.all(np.asarray(gather(np.int32(found)))))


def _logps_of(rows: RowSource, run: Callable[[Mapping[str, jax.Array]], jax.Array], *, batch_size: int,
              collate: Callable, mesh: jax.sharding.Mesh) -> np.ndarray:
    """`[num_pairs, 2]`: `run` over `rows` in evaluation batches, each pair's result put at its example id (the
    padding rows of the last batch, id -1, dropped)."""
    batch_sh = sharding.batch_sharding(mesh)
    num_rows = len(rows["example_id"]) if isinstance(rows, Mapping) and "example_id" in rows else len(rows)
    result = np.zeros((num_rows, 2), np.float32)
    loader = EvalBatches(rows, batch_size, collate=collate, process_index=jax.process_index(),
                         process_count=jax.process_count(), multiple_of=sharding.data_parallel_size(mesh))
    for batch in loader:
        ids = batch.pop("example_id")
        device_batch = sharding.to_global_arrays(batch, batch_sh)
        logps = np.asarray(jax.experimental.multihost_utils.process_allgather(run(device_batch), tiled=True))
        all_ids = np.asarray(jax.experimental.multihost_utils.process_allgather(jnp.asarray(ids), tiled=True))
        real = all_ids >= 0
        result[all_ids[real]] = logps[real]
    return result


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
