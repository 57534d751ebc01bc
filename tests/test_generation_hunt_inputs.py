"""`pad_prompts` and `generate` refuse inputs that would otherwise fail deep inside numpy or JAX, naming the field."""

import numpy as np
import pytest

from easytrain.generation import GenerationError, generate, pad_prompts
from easytrain.models import init_model

from model_configs import tiny_config


@pytest.mark.parametrize("prompts, multiple, field", [
    ([], 1, "prompts"),  # was ValueError: max() arg is an empty sequence
    ([[1, 2]], 0, "multiple"),  # was ZeroDivisionError
    ([[1, 2]], -4, "multiple"),  # was a numpy broadcast error
    ([[1, 2]], 2.0, "multiple"),
])
def test_pad_prompts_refuses_an_empty_batch_and_a_bad_multiple_by_name(prompts, multiple, field):
    with pytest.raises(GenerationError, match=field):
        pad_prompts(prompts, 0, multiple=multiple)


def test_pad_prompts_keeps_a_multiple_of_one_and_rounds_up_to_a_larger_one():
    ids_NL, mask_NL = pad_prompts([[5, 6, 7]], 0, multiple=4)
    assert ids_NL.tolist() == [[0, 5, 6, 7]] and mask_NL.tolist() == [[0, 1, 1, 1]]
    assert pad_prompts([[5, 6, 7]], 0)[0].shape == (1, 3)


@pytest.mark.parametrize("seed", [None, 1.5, "0", True])
def test_a_seed_that_is_not_an_int_is_refused_by_name(seed):
    model = init_model(tiny_config(), seed=0)
    with pytest.raises(GenerationError, match="seed"):  # was: None is not a valid value for jnp.array
        generate(model, np.array([[1, 2, 3]]), max_new_tokens=1, seed=seed)


@pytest.mark.parametrize("prompts, pad_id, match", [
    ([[1, 2]], None, r"pad_id = None"),  # a tokenizer without a pad token; was TypeError: int() argument ... 'NoneType'
    ([[1, 2], [3]], 0.5, r"pad_id = 0.5"),  # was silently padded with 0
    ([1, 2], 0, r"prompts\[0\] = 1 is not a list of int token ids"),  # one prompt, not a list of them; was
    # TypeError: object of type 'int' has no len()
    ([[1, 2.5]], 0, r"prompts\[0\] = \[1, 2.5\] is not a list of int token ids"),  # was silently read as [1, 2]
])
def test_pad_prompts_refuses_a_pad_id_or_prompt_that_is_not_int_ids_by_name(prompts, pad_id, match):
    with pytest.raises(GenerationError, match=match):
        pad_prompts(prompts, pad_id)


def test_pad_prompts_takes_numpy_ids_and_an_empty_prompt():
    ids_NL, mask_NL = pad_prompts([np.array([4, 5], np.int64), [], (6,)], np.int32(0), side="right")
    assert ids_NL.tolist() == [[4, 5], [0, 0], [6, 0]] and mask_NL.tolist() == [[1, 1], [0, 0], [1, 0]]
