"""`generate(..., generation_config=...)` accepts the values of unimplemented fields that transformers applies as
nothing (guidance_scale=1, min_new_tokens=0, min_p=0, an empty suppress_tokens, ...) and still refuses every other
value. Each accepted value is checked against transformers' own logits processors: a value that changes them
would be refused."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import pytest
import torch
import transformers

from easytrain.generation import GenerationError, generate
from easytrain.models import init_model

from model_configs import tiny_config

PROMPT = [5, 17, 33]

# Each with the sampling mode it is read in: min_p only applies when sampling.
NEUTRAL = [
    (dict(guidance_scale=1.0), False), (dict(guidance_scale=1), True), (dict(min_new_tokens=0), False),
    (dict(min_p=0.0), True), (dict(suppress_tokens=[]), False), (dict(begin_suppress_tokens=[]), True),
    (dict(penalty_alpha=0.0), False), (dict(token_healing=False), False), (dict(use_mtp=False), False),
    (dict(exponential_decay_length_penalty=(2, 1.0)), False),
]
STILL_REFUSED = [
    dict(guidance_scale=1.5), dict(min_new_tokens=2), dict(suppress_tokens=[3]), dict(begin_suppress_tokens=[3]),
    dict(penalty_alpha=0.6, top_k=4), dict(token_healing=True), dict(exponential_decay_length_penalty=(2, 1.5)),
    dict(do_sample=True, min_p=0.1), dict(do_sample=True, top_h=1.0),  # top-h keeps at most 100 tokens even at 1
    dict(bad_words_ids=[]), dict(sequence_bias={}),  # transformers refuses these empty values itself
    dict(watermarking_config={}),  # an empty one watermarks with the default settings
]


@pytest.fixture(scope="module")
def model():
    return init_model(tiny_config(initializer_range=0.2), seed=0)


@pytest.fixture(scope="module")
def torch_model() -> transformers.PreTrainedModel:
    """Only its logits processors are read: a one-layer model is enough to build them."""
    config = transformers.LlamaConfig(vocab_size=300, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                      intermediate_size=32)
    return transformers.LlamaForCausalLM(config).eval()


def processed_by_transformers(torch_model, fields: dict, do_sample: bool) -> torch.Tensor:
    """Random next-token scores after the logits processors transformers' generate builds from `fields`."""
    config = transformers.GenerationConfig(do_sample=do_sample, top_k=0 if do_sample else None, **fields)
    config._eos_token_tensor = torch.tensor([2])
    ids = torch.tensor([PROMPT * 2])
    processors = torch_model._get_logits_processor(
        generation_config=config, input_ids_seq_length=ids.shape[1], encoder_input_ids=ids,
        prefix_allowed_tokens_fn=None, logits_processor=None, device="cpu", model_kwargs={})
    torch.manual_seed(0)
    return processors(ids, 3 * torch.randn(1, 300))


@pytest.mark.parametrize("fields, do_sample", NEUTRAL)
def test_a_neutral_value_is_accepted_and_decodes_as_without_it(model, torch_model, fields, do_sample):
    assert torch.equal(processed_by_transformers(torch_model, fields, do_sample),
                       processed_by_transformers(torch_model, {}, do_sample)), "transformers applies this value"
    assert transformers.GenerationConfig(**fields).get_generation_mode().value in ("greedy_search", "sample")
    ids = np.array([PROMPT, PROMPT[::-1]])
    plain = dict(do_sample=do_sample)
    with_field = dict(plain, **fields)
    np.testing.assert_array_equal(generate(model, ids, max_new_tokens=4, generation_config=with_field, seed=3),
                                  generate(model, ids, max_new_tokens=4, generation_config=plain, seed=3))


@pytest.mark.parametrize("fields", STILL_REFUSED)
def test_any_other_value_of_those_fields_is_still_refused(model, fields):
    named = next(name for name in fields if name not in ("do_sample", "top_k"))
    with pytest.raises(GenerationError, match=rf"generation_config sets .*{named}="):
        generate(model, np.array([PROMPT]), max_new_tokens=2, generation_config=fields)
