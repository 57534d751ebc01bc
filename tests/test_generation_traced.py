"""`generate_traced`: the sampler for use inside a compiled program (a rollout in a train step) gives the tokens the
host-side `generate` gives for the same key, greedy and sampled, traces inside `jax.jit`, and marks each row's
generated tokens (through its EOS) in its mask."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from easytrain.generation import Generated, GenerationError, generate, generate_traced, pad_prompts
from easytrain.models import init_model

from model_configs import tiny_config

PROMPTS = [[5, 17, 99, 3, 42, 8, 61], [11, 4], [70, 23, 9, 120, 33], [88]]
PAD, EOS = 0, 7


@pytest.fixture(scope="module")
def model():
    return init_model(tiny_config(initializer_range=0.2), seed=0)


def jitted(model, **settings):
    """`generate_traced` inside one `jax.jit`, the weights an argument of the program (as in a train step)."""
    graphdef, weights = nnx.split(model)

    @jax.jit
    def run(weights, ids_BL, mask_BL, key):
        return generate_traced(nnx.merge(graphdef, weights), ids_BL, mask_BL, key, **settings)

    return lambda ids_BL, mask_BL, key: run(weights, ids_BL, mask_BL, key)


@pytest.mark.parametrize("sampling", [{}, {"do_sample": True, "temperature": 1.5, "top_k": 20}],
                         ids=["greedy", "sampled"])
def test_inside_jit_it_gives_what_generate_gives_for_the_same_seed(model, sampling):
    ids_BL, mask_BL = pad_prompts(PROMPTS, PAD)
    settings = dict(max_new_tokens=12, eos_token_id=EOS, pad_token_id=PAD, **sampling)
    for seed in (0, 3):
        expected_BN = generate(model, ids_BL, mask_BL, seed=seed, **settings)
        out = jitted(model, **settings)(jnp.asarray(ids_BL), jnp.asarray(mask_BL), jax.random.key(seed))
        assert isinstance(out, Generated) and out.tokens.dtype == jnp.int32
        np.testing.assert_array_equal(np.asarray(out.tokens), expected_BN, err_msg=f"seed {seed}")
    other = jitted(model, **settings)(jnp.asarray(ids_BL), jnp.asarray(mask_BL), jax.random.key(1))
    if sampling:
        assert not np.array_equal(np.asarray(other.tokens), expected_BN), "the key decides the sample"


def test_the_mask_covers_each_row_through_its_eos(model):
    ids_BL, mask_BL = pad_prompts(PROMPTS, PAD)
    free = generate(model, ids_BL, mask_BL, max_new_tokens=10)  # no EOS: pick an id some rows emit mid-way
    eos = int(free[0, 3])
    out = generate_traced(model, ids_BL, mask_BL, jax.random.key(0), max_new_tokens=10, eos_token_id=eos,
                          pad_token_id=PAD)
    tokens, mask = np.asarray(out.tokens), np.asarray(out.mask)
    assert mask.dtype == np.int32 and mask.shape == tokens.shape
    for row in range(len(PROMPTS)):
        hits = np.flatnonzero(tokens[row] == eos)
        length = hits[0] + 1 if hits.size else tokens.shape[1]
        np.testing.assert_array_equal(mask[row], np.arange(10) < length, err_msg=f"row {row}")
        assert (tokens[row, length:] == PAD).all()
    assert mask[0].sum() == 4, "row 0 ends at its EOS, the fourth token"
    unbounded = generate_traced(model, ids_BL, mask_BL, jax.random.key(0), max_new_tokens=10)
    assert np.asarray(unbounded.mask).all(), "without an EOS every token is generated"


def test_raw_key_data_is_accepted_like_the_key(model):
    """`TrainState.rng` is raw uint32 key data: both forms draw the same tokens."""
    ids_BL, mask_BL = pad_prompts(PROMPTS, PAD)
    settings = dict(max_new_tokens=5, do_sample=True)
    typed = generate_traced(model, ids_BL, mask_BL, jax.random.key(4), **settings).tokens
    raw = generate_traced(model, ids_BL, mask_BL, jax.random.key_data(jax.random.key(4)), **settings).tokens
    np.testing.assert_array_equal(np.asarray(typed), np.asarray(raw))


@pytest.mark.parametrize("ids, mask, match", [
    (np.array([1, 2, 3]), None, "input_ids has shape"),
    (np.array([[1, 2, 3]]), np.array([[1, 1]]), "attention_mask has shape"),
])
def test_bad_shapes_are_refused_while_tracing(model, ids, mask, match):
    with pytest.raises(GenerationError, match=match):
        generate_traced(model, ids, mask, jax.random.key(0), max_new_tokens=2)


def test_settings_are_checked_like_generate(model):
    with pytest.raises(GenerationError, match="max_new_tokens"):
        generate_traced(model, np.array([[1, 2]]), None, jax.random.key(0), max_new_tokens=0)
