"""Greedy completion of a batch of prompts at static shapes (one compile per prompt-buffer shape).

Without a KV cache it re-runs the whole buffer each token: fine for short evaluation completions
on small models.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx


def right_pad(prompts: list[list[int]], length: int, pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """Prompts packed into a `[N, length]` buffer, plus each prompt's length."""
    ids_NL = np.full((len(prompts), length), pad_id, np.int32)
    for row, prompt in enumerate(prompts):
        ids_NL[row, : len(prompt)] = prompt
    return ids_NL, np.asarray([len(p) for p in prompts], np.int32)


@functools.partial(jax.jit, static_argnames=("max_new_tokens",))
def _greedy(graphdef, params, model_state, ids_NL, lengths_N, max_new_tokens: int):
    model = nnx.merge(graphdef, params, model_state)
    rows = jnp.arange(ids_NL.shape[0])
    positions_L = jnp.arange(ids_NL.shape[1])

    def body(t, ids_NL):
        mask_NL = (positions_L[None, :] < (lengths_N + t)[:, None]).astype(jnp.int32)
        logits_NLV = model(ids_NL, attention_mask_BT=mask_NL)
        next_N = jnp.argmax(logits_NLV[rows, lengths_N + t - 1], axis=-1).astype(ids_NL.dtype)
        return ids_NL.at[rows, lengths_N + t].set(next_N)

    ids_NL = jax.lax.fori_loop(0, max_new_tokens, body, ids_NL)
    new_tokens = lengths_N[:, None] + jnp.arange(max_new_tokens)[None, :]
    return jnp.take_along_axis(ids_NL, new_tokens, axis=1)


def greedy_complete(model: nnx.Module, prompts: list[list[int]], max_new_tokens: int, pad_id: int) -> np.ndarray:
    """Token ids of the `max_new_tokens` greedy continuations of each prompt, `[N, max_new_tokens]`."""
    length = max(len(p) for p in prompts) + max_new_tokens
    ids_NL, lengths_N = right_pad(prompts, length, pad_id)
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    return np.asarray(_greedy(graphdef, params, rest, ids_NL, lengths_N, max_new_tokens))
