"""What `generate` does between its decoding steps. Each step samples with its own key (the step folded into the
call's key): with one key for every step, a model whose next-token distribution barely changes from step to step
draws the same token again and again. Without a `pad_token_id`, a row ends in its first EOS id, as documented (and as
transformers pads), not in token 0, a real token of most vocabularies. And with several EOS ids, any of them ends a
row, not only the first."""

import numpy as np
import pytest

from easytrain.generation import generate
from easytrain.models import init_model
from model_configs import VOCAB, tiny_config

PROMPT = np.array([[5, 17, 99]])


@pytest.fixture(scope="module")
def near_uniform():
    return init_model(tiny_config(initializer_range=1e-6), seed=0)  # every next-token distribution nearly uniform


def test_each_decoding_step_draws_with_its_own_key(near_uniform):
    row = generate(near_uniform, PROMPT, max_new_tokens=24, do_sample=True, seed=3)[0].tolist()
    # 24 draws from a near-uniform distribution over 128 tokens repeat a token a few times at most
    assert len(set(row)) >= 16, f"{row}: the steps drew alike"
    assert generate(near_uniform, PROMPT, max_new_tokens=24, do_sample=True, seed=3)[0].tolist() == row


def test_the_pad_after_eos_defaults_to_the_first_eos_id(near_uniform):
    first = int(generate(near_uniform, PROMPT, max_new_tokens=1)[0, 0])
    assert first != 0 and first < VOCAB
    row = generate(near_uniform, PROMPT, max_new_tokens=5, eos_token_id=[first, 1])[0].tolist()
    assert row == [first] * 5, "greedy decoding ends at once; the rest is the first EOS id"
    padded = generate(near_uniform, PROMPT, max_new_tokens=5, eos_token_id=[first, 1], pad_token_id=2)[0].tolist()
    assert padded == [first, 2, 2, 2, 2]


def test_any_of_several_eos_ids_ends_a_row(near_uniform):
    """eos_token_id=[a, b]: the row stops at b too (as transformers does), the rest padded."""
    free = generate(near_uniform, PROMPT, max_new_tokens=6)[0].tolist()
    stop, never = free[2], next(token for token in range(1, VOCAB) if token not in free)
    assert stop not in free[:2], f"{free}: the third token must be new for the row to end there"
    row = generate(near_uniform, PROMPT, max_new_tokens=6, eos_token_id=[never, stop], pad_token_id=0)[0].tolist()
    assert row == free[:3] + [0, 0, 0]
