"""`generate(..., generation_config=...)`: a transformers-style generation config (a `GenerationConfig` or the
mapping of a generation_config.json) fills the settings the call leaves unset, with transformers' defaults
(top_k=50 when sampling); what it sets but `generate` does not implement is refused by name. Also the checks of
`do_sample`, ragged prompt lists and `max_length`."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import pytest
import transformers

from easytrain.generation import GenerationError, generate
from easytrain.models import LlamaForCausalLM, init_model

from model_configs import forward, tiny_config

PROMPT = [5, 17, 33]
ROWS = 512


@pytest.fixture(scope="module")
def model() -> LlamaForCausalLM:
    return init_model(tiny_config(initializer_range=0.2), seed=0)  # logits of order 1


@pytest.fixture(scope="module")
def flat() -> LlamaForCausalLM:
    return init_model(tiny_config(), seed=0)  # small logits: the top-p nucleus reaches far past rank 50


def ranks_of(model: LlamaForCausalLM, tokens: np.ndarray) -> np.ndarray:
    """Each token's rank in the next-token logits of PROMPT (0: the most likely)."""
    logits_V = np.asarray(forward(model, np.array([PROMPT]), np.ones((1, len(PROMPT)), np.int32)))[0, -1]
    rank_V = np.empty(len(logits_V), int)
    rank_V[np.argsort(-logits_V)] = np.arange(len(logits_V))
    return rank_V[tokens]


def draws(model: LlamaForCausalLM, **settings) -> np.ndarray:
    return generate(model, np.array([PROMPT] * ROWS), max_new_tokens=1, seed=1, **settings)[:, 0]


@pytest.mark.parametrize("config", [dict(do_sample=True, top_p=0.8),
                                    transformers.GenerationConfig(do_sample=True, top_p=0.8)])
def test_a_generation_config_samples_with_transformers_top_k_50(flat, config):
    """transformers applies top_k=50 unless the config sets another; without a config top_k stays None."""
    assert ranks_of(flat, draws(flat, do_sample=True, top_p=0.8)).max() >= 50, "the test needs a wide tail"
    assert ranks_of(flat, draws(flat, generation_config=config)).max() < 50
    np.testing.assert_array_equal(draws(flat, generation_config=config),
                                  draws(flat, do_sample=True, top_k=50, top_p=0.8))


def test_the_config_fills_only_the_settings_the_call_leaves_unset(model):
    config = dict(do_sample=True, temperature=0.7, top_k=20, top_p=0.9, eos_token_id=[3, 4], max_new_tokens=5)
    ids = np.array([PROMPT, PROMPT[::-1]])
    got = generate(model, ids, generation_config=config, top_k=5, seed=2)
    expected = generate(model, ids, do_sample=True, temperature=0.7, top_k=5, top_p=0.9, eos_token_id=[3, 4],
                        max_new_tokens=5, seed=2)
    np.testing.assert_array_equal(got, expected)
    greedy = generate(model, ids, max_new_tokens=4)
    np.testing.assert_array_equal(generate(model, ids, max_new_tokens=4, do_sample=False, generation_config=config,
                                           eos_token_id=None), greedy)
    no_top_k = dict(config, top_k=0)  # transformers' way to switch top-k off
    np.testing.assert_array_equal(generate(model, ids, generation_config=no_top_k, seed=2),
                                  generate(model, ids, generation_config=config, top_k=None, seed=2))


def test_a_greedy_config_ignores_its_sampling_fields_and_neutral_values_pass(model):
    """transformers ignores temperature/top-p/min_p when not sampling; neutral values (repetition_penalty=1.0,
    num_beams=1) and fields that do not change the tokens (bos_token_id, use_cache) are accepted."""
    config = dict(do_sample=False, temperature=0.6, top_p=0.9, min_p=0.1, repetition_penalty=1.0, num_beams=1,
                  bos_token_id=1, use_cache=True, transformers_version="5.23.0")
    ids = np.array([PROMPT])
    np.testing.assert_array_equal(generate(model, ids, max_new_tokens=4, generation_config=config),
                                  generate(model, ids, max_new_tokens=4))


@pytest.mark.parametrize("fields, named", [
    (dict(repetition_penalty=1.1), "repetition_penalty=1.1"),
    (dict(do_sample=True, min_p=0.05), "min_p=0.05"),
    (dict(num_beams=4), "num_beams=4"),
    (dict(do_sample=True, no_repeat_ngram_size=3, num_return_sequences=2),
     "no_repeat_ngram_size=3, num_return_sequences=2"),
])
@pytest.mark.parametrize("as_object", [False, True])
def test_settings_generate_does_not_implement_are_refused_by_name(model, fields, named, as_object):
    config = transformers.GenerationConfig(**fields) if as_object else fields
    with pytest.raises(GenerationError, match=rf"{named}.*neutral"):
        generate(model, np.array([PROMPT]), max_new_tokens=2, generation_config=config)


def test_a_generation_config_of_another_type_is_refused(model):
    with pytest.raises(GenerationError, match="generation_config = 'greedy'"):
        generate(model, np.array([PROMPT]), max_new_tokens=2, generation_config="greedy")


@pytest.mark.parametrize("value", ["False", None, 1, 0.0])
def test_do_sample_must_be_a_bool(model, value):
    """do_sample='False' sampled and None decoded greedily, both silently."""
    with pytest.raises(GenerationError, match=rf"do_sample = {value!r} must be a bool"):
        generate(model, np.array([PROMPT]), max_new_tokens=2, do_sample=value)


def test_a_numpy_bool_do_sample_is_accepted(model):
    ids = np.array([PROMPT])
    np.testing.assert_array_equal(generate(model, ids, max_new_tokens=3, do_sample=np.bool_(False)),
                                  generate(model, ids, max_new_tokens=3))


def test_ragged_prompt_lists_point_to_pad_prompts(model):
    with pytest.raises(GenerationError, match="pad_prompts"):
        generate(model, [[1, 2, 3], [4, 5]], max_new_tokens=2)


def test_max_length_is_refused_for_max_new_tokens(model):
    with pytest.raises(GenerationError, match="max_length.*max_new_tokens"):
        generate(model, np.array([PROMPT]), max_length=10)
    with pytest.raises(GenerationError, match="max_new_tokens"):
        generate(model, np.array([PROMPT]), generation_config=dict(max_length=10))


def test_the_generation_config_a_checkpoint_was_loaded_with_decodes_as_its_settings(model, tmp_path):
    """An instruct checkpoint's generation_config.json (extra EOS, sampling defaults), kept by from_pretrained."""
    from easytrain.models import from_pretrained, save_pretrained
    from easytrain.models.hf_load import generation_config_of

    instruct = transformers.GenerationConfig(bos_token_id=1, eos_token_id=[2, 7], do_sample=True, temperature=0.7,
                                             top_p=0.8)
    save_pretrained(tmp_path, model, model.config, generation_config=instruct)
    loaded = from_pretrained(tmp_path)
    ids = np.array([PROMPT] * 4)
    np.testing.assert_array_equal(
        generate(loaded, ids, max_new_tokens=6, seed=4, generation_config=generation_config_of(loaded)),
        generate(model, ids, max_new_tokens=6, seed=4, do_sample=True, temperature=0.7, top_k=50, top_p=0.8,
                 eos_token_id=[2, 7]))


def test_a_negative_pad_of_a_config_is_not_emitted_after_eos(model, caplog):
    """LLaMA-1 conversions carry `pad_token_id: -1`, which transformers reads with a warning: rows that finish must
    not fill with -1 (no token id: decoding fails), but with the default pad, the first EOS id."""
    ids = np.array([PROMPT, PROMPT[::-1]])
    first = generate(model, ids, max_new_tokens=1)[:, 0]
    eos = int(first[0])  # row 0 ends at its first token: every later position is pad
    config = dict(eos_token_id=eos, pad_token_id=-1, max_new_tokens=4)
    with caplog.at_level("WARNING", logger="easytrain"):
        got = generate(model, ids, generation_config=config)
    assert (got >= 0).all(), got
    np.testing.assert_array_equal(got, generate(model, ids, eos_token_id=eos, max_new_tokens=4))
    assert "pad_token_id=-1" in caplog.text and "generation_config" in caplog.text


def test_a_negative_pad_passed_to_the_call_is_refused(model):
    with pytest.raises(GenerationError, match="pad_token_id = -1"):
        generate(model, np.array([PROMPT]), max_new_tokens=2, eos_token_id=2, pad_token_id=-1)
