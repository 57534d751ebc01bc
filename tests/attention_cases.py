"""Masking cases shared by the attention-implementation tests: a tiny model per case, its logits and the
gradients of a random linear function of them."""

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from easytrain.models import init_model
from model_configs import VOCAB, family_config, right_padded_batch, tiny_config

LENGTHS = (12, 7, 3)


def packed_batch() -> dict[str, np.ndarray]:
    """Row 0: documents of 5, 4 and 2 tokens then one padding token; row 1: 7 and 5 tokens."""
    segments_BT = np.array([[1] * 5 + [2] * 4 + [3] * 2 + [0], [1] * 7 + [2] * 5])
    starts_BT = np.concatenate([np.ones((2, 1), bool), segments_BT[:, 1:] != segments_BT[:, :-1]], axis=1)
    index_T = np.arange(12)
    positions_BT = index_T - np.maximum.accumulate(np.where(starts_BT, index_T, 0), axis=1)
    return dict(attention_mask_BT=(segments_BT > 0).astype(np.int32), segment_ids_BT=segments_BT,
                positions_BT=positions_BT)


def case(name: str):
    """(config, ids, model keyword inputs) of one masking case."""
    ids_BT, right_BT = right_padded_batch(lengths=LENGTHS)
    if name == "causal":
        return tiny_config(num_key_value_heads=4), ids_BT, {}
    if name == "gqa":
        return tiny_config(), ids_BT, {}
    if name == "sliding_window":
        return family_config("mistral", sliding_window=4), ids_BT, {}
    if name == "right_padding":
        return tiny_config(), ids_BT, dict(attention_mask_BT=right_BT)
    if name == "left_padding":  # not trailing: the boolean key-mask fallback
        return tiny_config(), ids_BT, dict(attention_mask_BT=right_BT[:, ::-1].copy())
    if name == "packing":
        return family_config("mistral", sliding_window=4), ids_BT[:2], packed_batch()
    raise ValueError(name)


def value_and_grads(name: str, implementation: str, dtype=jnp.float32, real_only: bool = False):
    """Logits of one masking case and the gradients of a random linear function of them (of the real
    tokens' logits only with `real_only`)."""
    config, ids_BT, inputs = case(name)
    model = init_model(config, seed=0, dtype=dtype)
    model.attention_implementation = implementation
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    weights_BTV = jnp.asarray(np.random.RandomState(1).randn(*ids_BT.shape, VOCAB), jnp.float32)
    if real_only:
        weights_BTV = weights_BTV * real_tokens(name)[:, :, None]

    def loss(p):
        logits_BTV = nnx.merge(graphdef, p, rest)(jnp.asarray(ids_BT), **jax.tree.map(jnp.asarray, inputs))
        return jnp.sum(logits_BTV * weights_BTV), logits_BTV

    (_, logits_BTV), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(params)
    return logits_BTV, grads


def real_tokens(name: str) -> np.ndarray:
    """``[B, T]`` True where a case's row holds a real token."""
    _, ids_BT, inputs = case(name)
    return np.asarray(inputs.get("attention_mask_BT", np.ones(ids_BT.shape)), bool)


def assert_close(actual, expected, rel: float) -> None:
    """Every element within ``rel`` of the largest magnitude of ``expected`` (tolerance on the leaf's scale)."""
    actual, expected = np.asarray(actual, np.float32), np.asarray(expected, np.float32)
    assert np.abs(actual - expected).max() <= rel * np.abs(expected).max()


CASES = ["causal", "gqa", "sliding_window", "right_padding", "left_padding", "packing"]
