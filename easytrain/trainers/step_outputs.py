"""Where the outputs of a function `BaseTrainer.compile_step` compiles live: replicated on every device, or split
over the data-parallel axes like the batch (`batch_outputs`), so rows a compiled rollout makes inside
`train_iteration` feed the train step as they are, its inputs being laid out that way."""

from __future__ import annotations

from collections.abc import Collection, Mapping
from typing import Any, Callable

import jax
from jax.sharding import Mesh

from easytrain import sharding

#: `compile_step`'s choice: False (every output replicated), True (every output split like the batch), or the names
#: of the entries of a dict of outputs split like the batch (the others replicated).
BatchOutputs = bool | Collection[str]


def check_batch_outputs(batch_outputs: Any) -> None:
    """Refuse, before any tracing, a value that is neither a bool nor a collection of names (a lone string too)."""
    if isinstance(batch_outputs, bool):
        return
    if isinstance(batch_outputs, str) or not isinstance(batch_outputs, Collection) \
            or not all(isinstance(name, str) for name in batch_outputs):
        raise TypeError(f"compile_step's batch_outputs must be True, False or a collection of output names, got "
                        f"{batch_outputs!r}; pass e.g. batch_outputs=('input_ids', 'targets') for those entries of a "
                        "dict of outputs, or True for every output.")


def laid_out(fn: Callable[..., Any], batch_outputs: BatchOutputs, returns_state: bool,
             mesh: Mesh) -> tuple[Callable[..., Any], Any]:
    """`fn` (constrained where names choose) and the outputs' sharding for `jax.jit` (None: XLA follows the
    constraints). A prefix sharding covers every leaf of the outputs, so True needs no constraint."""
    rows, replicated = sharding.batch_sharding(mesh), sharding.replicated(mesh)
    if batch_outputs is False or batch_outputs is True:
        return fn, rows if batch_outputs else replicated
    names = frozenset(batch_outputs)

    def constrained(*args: Any) -> Any:
        result = fn(*args)
        state, outputs = result if returns_state else (None, result)
        outputs = split_named(outputs, names, rows, replicated)
        return (state, outputs) if returns_state else outputs

    constrained.__name__ = constrained.__qualname__ = getattr(fn, "__name__", "step")  # compile logs name `fn`
    return constrained, None


def split_named(outputs: Any, names: frozenset[str], rows: Any, replicated: Any) -> dict[str, Any]:
    """Each named entry's arrays split like the batch, every other entry's replicated."""
    if not isinstance(outputs, Mapping) or (missing := sorted(names - set(outputs))):
        have = sorted(outputs) if isinstance(outputs, Mapping) else type(outputs).__name__
        raise TypeError(f"compile_step's batch_outputs names {sorted(names)}, but the function returns {have}"
                        f"{f' (no {missing})' if isinstance(outputs, Mapping) else ''}; return a dict holding those "
                        "entries, or pass batch_outputs=True to split every output like the batch.")
    return {name: jax.tree.map(lambda leaf: jax.lax.with_sharding_constraint(
                leaf, rows if name in names else replicated), value)
            for name, value in outputs.items()}
