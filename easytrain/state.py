"""`TrainState`: the whole mutable part of a run as one immutable pytree.

Trainable variables and the rest of the module's variables are plain nested dicts
(`nnx.to_pure_dict`), so checkpoint keys are stable variable paths and `model()` rebuilds the module
inside the traced step. The graph definition, the optimizer and the trainable filter are static.
"""

from __future__ import annotations

import zlib
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx, struct

PyTree = Any


class TrainState(struct.PyTreeNode):
    """Step counter, trainable parameters, other module state, optimizer state and a raw PRNG key.

    `step` counts batches consumed (optimizer steps, skipped ones included), never micro-batches; the
    learning-rate schedule reads it. `params` holds the variables that `trainable` selects; they alone
    get gradients and optimizer state. `model_state` holds every other variable of the module (frozen
    parameters, BatchNorm statistics, dropout RNG streams); the train step writes its new values back.
    `rng` is raw `uint32[2]` key data so it checkpoints like any array; per-step keys are
    `fold_in(rng, step)`, so a resumed run draws exactly the same randomness. `frozen` holds named
    non-trainable pytrees beside the model (a reference policy, a teacher, an EMA copy): arguments of
    the compiled step like everything else here, never differentiated, with no optimizer state. Those
    named in `frozen_modules` are module states, handed to the loss as modules in eval mode; only those
    in `frozen_checkpointed` are written to checkpoints, the others are rebuilt on resume.

    `base` holds the module's variables that `base_filter` selects: the frozen pretrained weights under
    LoRA adapters. They are part of the module like `model_state`, but never change and are never
    checkpointed: a resumed run loads them again from their source and checks their fingerprint.
    """

    step: jax.Array
    params: PyTree
    model_state: PyTree
    opt_state: optax.OptState
    rng: jax.Array
    graphdef: nnx.GraphDef = struct.field(pytree_node=False)
    tx: optax.GradientTransformation = struct.field(pytree_node=False)
    trainable: nnx.filterlib.Filter = struct.field(pytree_node=False, default=nnx.Param)
    frozen: dict[str, PyTree] = struct.field(default_factory=dict)
    frozen_modules: tuple[tuple[str, nnx.GraphDef], ...] = struct.field(pytree_node=False, default=())
    frozen_checkpointed: tuple[str, ...] = struct.field(pytree_node=False, default=())
    base: PyTree = struct.field(default_factory=dict)
    base_filter: nnx.filterlib.Filter = struct.field(pytree_node=False, default=nnx.Nothing)

    @classmethod
    def create(cls, *, graphdef: nnx.GraphDef, params: PyTree, model_state: PyTree,
               tx: optax.GradientTransformation, rng: jax.Array,
               trainable: nnx.filterlib.Filter = nnx.Param, base: PyTree | None = None,
               base_filter: nnx.filterlib.Filter = nnx.Nothing) -> "TrainState":
        return cls(step=jnp.zeros((), jnp.int32), params=params, model_state=model_state,
                   opt_state=tx.init(params), rng=rng, graphdef=graphdef, tx=tx, trainable=trainable,
                   base={} if base is None else base, base_filter=base_filter)

    def apply_gradients(self, grads: PyTree, **extra_args: Any) -> "TrainState":
        """One optimizer update; returns a new state and leaves `self` untouched.

        `extra_args` (e.g. `grad_norm`, which `easytrain.optim.clip_by_global_norm` reuses) go to the
        optimizer's update when it takes extra arguments (`optax.GradientTransformationExtraArgs`, as every
        `optax.chain` is); a plain `GradientTransformation` is called without them.
        """
        params, opt_state = optimizer_update(self.tx, self.params, self.opt_state, grads, extra_args)
        return self.replace(step=self.step + 1, params=params, opt_state=opt_state)

    def model(self, train: bool | None = None) -> nnx.Module:
        """The NNX module these variables describe (inside or outside `jax.jit`).

        `train=True` / `False` switches it to training / evaluation mode (`nnx.Module.train()` / `.eval()`:
        dropout on or off, BatchNorm batch or running statistics); None leaves the mode it was built with.
        """
        module = nnx.merge(self.graphdef, self.params, self.base, self.model_state)
        if train is True:
            module.train()
        elif train is False:
            module.eval()
        return module

    def model_state_of(self, module: nnx.Module) -> PyTree:
        """`module`'s non-trainable variables as a pure dict, e.g. after a forward pass updated them."""
        return nnx.to_pure_dict(nnx.split(module, self.trainable, self.base_filter, ...)[3])

    def frozen_views(self) -> dict[str, Any]:
        """The frozen entries as the loss sees them: modules (in eval mode) or plain pytrees."""
        graphdefs = dict(self.frozen_modules)
        views = {}
        for name, value in self.frozen.items():
            if name in graphdefs:
                value = nnx.merge(graphdefs[name], value)
                value.eval()
            views[name] = value
        return views

    def checkpointed(self) -> "TrainState":
        """The part of the state a checkpoint holds: the base and the frozen entries that are rebuilt on resume
        are left out."""
        return self.replace(frozen={k: v for k, v in self.frozen.items() if k in self.frozen_checkpointed}, base={})

    def step_rng(self) -> jax.Array:
        """A PRNG key unique to this step, reproducible after a resume. The loss gets `fold_in(step_rng(), i)` for
        micro-batch `i` (0 without accumulation), never this key itself, so a draw of its own from it is fresh."""
        return jax.random.fold_in(jax.random.wrap_key_data(self.rng), self.step)

    def stream_rng(self, name: str) -> jax.Array:
        """A PRNG key unique to this step and to the stream `name` (a rollout's sampling, a teacher's noise),
        reproducible after a resume. Never one of the loss's keys, `fold_in(step_rng(), micro_index)`, whatever
        the accumulation, as `fold_in(step_rng(), 7)` is with 8 micro-batches: the name folds into the run's key
        first, as a number of 2**31 or more (a step never is), and the step after it. The stream "eval" gives the
        loss's keys in evaluation (`easytrain.steps.eval_key`)."""
        tag = np.uint32(zlib.crc32(name.encode()) | 0x80000000)
        return jax.random.fold_in(jax.random.fold_in(jax.random.wrap_key_data(self.rng), tag), self.step)


def split_model(model: nnx.Module, trainable: nnx.filterlib.Filter = nnx.Param
                ) -> tuple[nnx.GraphDef, PyTree, PyTree]:
    """Graph definition plus trainable and all other variables, as pure dicts."""
    graphdef, params, rest = nnx.split(model, trainable, ...)
    return graphdef, nnx.to_pure_dict(params), nnx.to_pure_dict(rest)


def bind(module: nnx.Module, state: TrainState) -> nnx.Module:
    """Point `module`'s variables at `state`'s arrays (no copy), so a handed-out module shows the current state."""
    graph_state = nnx.state(module)
    for part in (state.params, state.base, state.model_state):
        nnx.replace_by_pure_dict(graph_state, part)
    nnx.update(module, graph_state)
    return module


def raw_key(seed: int) -> jax.Array:
    return jax.random.key_data(jax.random.key(seed))


def optimizer_update(tx: optax.GradientTransformation, params: PyTree, opt_state: optax.OptState,
                     grads: PyTree, extra_args: dict[str, Any] | None = None) -> tuple[PyTree, optax.OptState]:
    """`tx`'s update applied to `params`: the new parameters and optimizer state.

    A nested `jax.jit`, so a step that applies the update twice with the same input types (both branches
    of the non-finite guard) traces it once and reuses that trace (and its lowering): 0.04 s less of
    the benchmark Llama's 0.43 s first-step tracing, more with more parameter leaves. An optimizer that
    cannot be a static argument (not hashable) is traced inline.
    """
    extra_args = extra_args if isinstance(tx, optax.GradientTransformationExtraArgs) and extra_args else {}
    try:
        hash(tx)
    except TypeError:
        return _update(tx, params, opt_state, grads, extra_args)
    return _jitted_update(tx, params, opt_state, grads, extra_args)


def _update(tx: optax.GradientTransformation, params: PyTree, opt_state: optax.OptState, grads: PyTree,
            extra_args: dict[str, Any]) -> tuple[PyTree, optax.OptState]:
    if "grad_norm" in extra_args:  # the tree the norm belongs to: clipping uses it only on these very gradients
        extra_args = {**extra_args, "grad_norm_of": grads}
    updates, opt_state = tx.update(grads, opt_state, params, **extra_args)
    return optax.apply_updates(params, updates), opt_state


_jitted_update = jax.jit(_update, static_argnums=0)
