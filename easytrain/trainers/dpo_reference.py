"""The reference side of preference training: which model, and log-probabilities computed ahead of time.

`update_then_sync` moves a TR-DPO reference toward the policy inside the train step. `with_values` runs the
policy's own weights with other values for some variables: under LoRA from a trained adapter
(`lora_adapter_path`), the reference is the base with a copy of that adapter's values as loaded.

`precomputed_reference_logps` runs the reference model over every pair once, in one compiled pass,
before training, and caches the result on disk under a key made of the data's and the reference
weights' fingerprints; a second run (or a resumed one) with the same data and reference reads the
cache instead of recomputing, and the reference's parameters are released before training starts.
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
from flax import nnx, traverse_util

from easytrain import integrity, sharding
from easytrain.data import EvalBatches, RowSource
from easytrain.frozen import Frozen, place_frozen

logger = logging.getLogger("easytrain")
CACHE_DIRNAME = "reference_logps"
#: `state.frozen` entry of the trainable values a LoRA run started from (`lora_adapter_path`'s adapter as loaded).
INITIAL_ADAPTERS = "initial_adapters"


def with_values(module: nnx.Module, selected: nnx.filterlib.Filter, values: Any) -> nnx.Module:
    """A module of `module`'s graph and variables, except those `selected` takes from `values` (a pure dict), in
    eval mode; `module` is left as it is (also inside a traced step)."""
    graphdef, _, rest = nnx.split(module, selected, ...)
    out = nnx.merge(graphdef, values, nnx.to_pure_dict(rest))
    out.eval()
    return out


def cache_key(data_fingerprint: str, reference_digests: Mapping[str, Any], settings: Mapping[str, Any]) -> str:
    """A name for one (data, reference weights, tokenisation settings) combination."""
    payload = json.dumps({"data": data_fingerprint, "reference": reference_digests, "settings": settings},
                         sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:24]


def precomputed_reference_logps(reference: Frozen, rows: RowSource, *, data_fingerprint: str,
                                settings: Mapping[str, Any], collate: Callable, batch_size: int,
                                sequence_logps: Callable[[nnx.Module, Mapping[str, jax.Array]], jax.Array],
                                mesh: jax.sharding.Mesh, rules: sharding.LogicalRules, cache_dir: Path,
                                is_main_process: bool, compiler_options: Mapping[str, Any] | None = None
                                ) -> tuple[np.ndarray, bool]:
    """`[num_pairs, 2]` reference log-probs of (chosen, rejected) for every row, and whether they were
    read from the cache. The reference lives on the mesh only inside this function."""
    placed = place_frozen({"reference": reference}, mesh, rules)
    values, graphdef = placed.values["reference"], dict(placed.modules)["reference"]
    key = cache_key(data_fingerprint, integrity.fingerprint(values), settings)
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
