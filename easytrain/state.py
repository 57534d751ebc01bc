"""`TrainState`: the whole mutable part of a run as one immutable pytree.

Parameters and the rest of the model's variables are plain nested dicts (`nnx.to_pure_dict`), so
checkpoint keys are stable parameter paths and `nnx.merge(graphdef, params, model_state)` rebuilds
the module inside the traced step. The optimizer and graph definition are static (not leaves).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx, struct

PyTree = Any


class TrainState(struct.PyTreeNode):
    """Step counter, parameters, other model state, optimizer state and a raw PRNG key.

    `step` counts optimizer updates (batches consumed), never micro-batches; the learning-rate
    schedule reads it. `rng` is raw `uint32[2]` key data so it checkpoints like any array; per-step
    keys are `fold_in(rng, step)`, so a resumed run draws exactly the same randomness.
    """

    step: jax.Array
    params: PyTree
    model_state: PyTree
    opt_state: optax.OptState
    rng: jax.Array
    graphdef: nnx.GraphDef = struct.field(pytree_node=False)
    tx: optax.GradientTransformation = struct.field(pytree_node=False)

    @classmethod
    def create(cls, *, graphdef: nnx.GraphDef, params: PyTree, model_state: PyTree,
               tx: optax.GradientTransformation, rng: jax.Array) -> "TrainState":
        return cls(step=jnp.zeros((), jnp.int32), params=params, model_state=model_state,
                   opt_state=tx.init(params), rng=rng, graphdef=graphdef, tx=tx)

    def apply_gradients(self, grads: PyTree) -> "TrainState":
        """One optimizer update; returns a new state and leaves `self` untouched."""
        updates, opt_state = self.tx.update(grads, self.opt_state, self.params)
        params = optax.apply_updates(self.params, updates)
        return self.replace(step=self.step + 1, params=params, opt_state=opt_state)

    def model(self) -> nnx.Module:
        """The NNX module these parameters describe (inside or outside `jax.jit`)."""
        return nnx.merge(self.graphdef, self.params, self.model_state)

    def step_rng(self) -> jax.Array:
        """A PRNG key unique to this step, reproducible after a resume."""
        return jax.random.fold_in(jax.random.wrap_key_data(self.rng), self.step)


def split_model(model: nnx.Module) -> tuple[nnx.GraphDef, PyTree, PyTree]:
    """Graph definition plus parameter and non-parameter variables as pure dicts."""
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    return graphdef, nnx.to_pure_dict(params), nnx.to_pure_dict(rest)


def raw_key(seed: int) -> jax.Array:
    return jax.random.key_data(jax.random.key(seed))
