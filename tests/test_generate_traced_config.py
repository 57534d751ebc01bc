"""`generate_traced(..., generation_config=...)` resolves its settings as `generate` does: the config fills the
settings the call leaves unset (transformers' top_k=50 when sampling), so for the same key both draw the same
tokens, and fields neither implements are refused by name before anything is traced."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import transformers
from flax import nnx

from easytrain.generation import GenerationError, generate, generate_traced, pad_prompts
from easytrain.models import init_model

from model_configs import tiny_config

PROMPTS = [[5, 17, 99, 3, 42, 8, 61], [11, 4], [70, 23, 9, 120, 33], [88]] * 8
PAD = 0


@pytest.fixture(scope="module")
def model():
    return init_model(tiny_config(), seed=0)  # small logits: the top-p nucleus reaches past rank 50


def traced(model, ids_BL, mask_BL, key, **settings) -> np.ndarray:
    """`generate_traced`'s tokens from inside one `jax.jit`, the weights an argument (as in a train step)."""
    graphdef, weights = nnx.split(model)

    @jax.jit
    def run(weights, ids_BL, mask_BL, key):
        return generate_traced(nnx.merge(graphdef, weights), ids_BL, mask_BL, key, **settings).tokens

    return np.asarray(run(weights, jnp.asarray(ids_BL), jnp.asarray(mask_BL), key))


@pytest.mark.parametrize("config, settings", [
    (dict(do_sample=True, top_p=0.9, eos_token_id=[7, 9], max_new_tokens=6), {}),
    (transformers.GenerationConfig(do_sample=True, temperature=0.7, top_p=0.95, max_new_tokens=6), {}),
    (dict(do_sample=True, temperature=1.3, top_k=20, eos_token_id=7), dict(max_new_tokens=5, top_k=None)),
    (dict(do_sample=True, temperature=0.6, top_p=0.8, pad_token_id=3), dict(max_new_tokens=4, do_sample=False)),
], ids=["mapping", "transformers", "call-overrides", "greedy-call"])
def test_generate_traced_draws_what_generate_draws_with_the_same_config_and_key(model, config, settings):
    ids_BL, mask_BL = pad_prompts(PROMPTS, PAD)
    for seed in (0, 5):
        expected_BN = generate(model, ids_BL, mask_BL, seed=seed, generation_config=config, **settings)
        got_BN = traced(model, ids_BL, mask_BL, jax.random.key(seed), generation_config=config, **settings)
        np.testing.assert_array_equal(got_BN, expected_BN, err_msg=f"seed {seed}")


def test_the_config_changes_what_generate_traced_draws(model):
    """transformers' top_k=50 (unset in the config) applies when sampling: not the draws without a config."""
    ids_BL, mask_BL = pad_prompts(PROMPTS, PAD)
    key = jax.random.key(2)
    with_config = traced(model, ids_BL, mask_BL, key, generation_config=dict(do_sample=True, max_new_tokens=6))
    np.testing.assert_array_equal(with_config, traced(model, ids_BL, mask_BL, key, max_new_tokens=6, do_sample=True,
                                                      top_k=50))
    assert not np.array_equal(with_config, traced(model, ids_BL, mask_BL, key, max_new_tokens=6, do_sample=True))


@pytest.mark.parametrize("fields, named", [
    (dict(repetition_penalty=1.1), "repetition_penalty=1.1"),
    (dict(do_sample=True, min_p=0.05), "min_p=0.05"),
    (dict(num_beams=4), "num_beams=4"),
])
@pytest.mark.parametrize("as_object", [False, True])
def test_unimplemented_fields_are_refused_by_name_before_the_model_is_read(fields, named, as_object):
    """The refusal comes first: here the model is not even a model, and nothing gets traced."""
    config = transformers.GenerationConfig(**fields) if as_object else fields
    with pytest.raises(GenerationError, match=rf"{named}.*neutral"):
        generate_traced(object(), np.array([[1, 2]]), None, jax.random.key(0), max_new_tokens=2,
                        generation_config=config)


def test_max_new_tokens_may_come_from_the_config_and_is_required(model):
    ids_BL, mask_BL = pad_prompts(PROMPTS[:4], PAD)
    out = generate_traced(model, ids_BL, mask_BL, jax.random.key(0), generation_config=dict(max_new_tokens=3))
    np.testing.assert_array_equal(np.asarray(out.tokens), generate(model, ids_BL, mask_BL, max_new_tokens=3))
    with pytest.raises(GenerationError, match="max_new_tokens is required"):
        generate_traced(model, ids_BL, mask_BL, jax.random.key(0), generation_config=dict(do_sample=False))
    with pytest.raises(GenerationError, match="generation_config = 'greedy'"):
        generate_traced(model, ids_BL, mask_BL, jax.random.key(0), max_new_tokens=2, generation_config="greedy")
