"""`TrainState.stream_rng(name)`: a per-step key of a named stream that never meets the loss's keys
(`fold_in(step_rng, micro_index)`, whatever the accumulation) nor another name's, and is the same after a resume."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from easytrain.state import TrainState, raw_key


def state_at(step: int, seed: int = 0) -> TrainState:
    graphdef, params = nnx.split(nnx.Linear(2, 2, rngs=nnx.Rngs(0)), nnx.Param)
    state = TrainState.create(graphdef=graphdef, params=nnx.to_pure_dict(params), model_state={},
                              tx=optax.sgd(0.1), rng=raw_key(seed))
    return state.replace(step=jnp.int32(step))


def data(key) -> tuple[int, ...]:
    return tuple(np.asarray(jax.random.key_data(key)).tolist())


def test_a_named_stream_never_meets_the_loss_keys_of_any_micro_batch():
    loss_keys = {data(jax.random.fold_in(state_at(step).step_rng(), micro)) for step in range(4) for micro in range(64)}
    for step in range(4):
        for name in ("rollout", "teacher_noise"):
            assert data(state_at(step).stream_rng(name)) not in loss_keys, (step, name)
            assert data(state_at(step).stream_rng(name)) != data(state_at(step).step_rng())


def test_streams_differ_by_name_and_step_and_repeat_for_the_same_state():
    keys = {data(state_at(step).stream_rng(name)) for step in range(5) for name in ("a", "b", "rollout")}
    assert len(keys) == 15
    assert data(state_at(3).stream_rng("rollout")) == data(state_at(3).stream_rng("rollout")), "a resume draws it again"
    assert data(state_at(3, seed=1).stream_rng("rollout")) != data(state_at(3).stream_rng("rollout"))


def test_it_traces():
    key = jax.jit(lambda state: jax.random.key_data(state.stream_rng("rollout")))(state_at(2))
    assert tuple(np.asarray(key).tolist()) == data(state_at(2).stream_rng("rollout"))
