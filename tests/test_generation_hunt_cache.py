"""A key/value cache too small for the tokens written into it is refused when `decode` runs eagerly: the write
would be clamped into the last slots (`lax.dynamic_update_slice`), overwriting earlier keys without an error
(before, a 4-slot cache decoding a fifth token gave logits 0.12 off the full forward pass, silently)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from easytrain.models import init_model
from easytrain.models.kv_cache import CacheOverflowError, advance, check_room, init_cache

from model_configs import tiny_config


def cache_after(written: int, slots: int = 4):
    """A one-row cache of ``slots`` slots with ``written`` of them filled."""
    cache = init_cache(1, 1, slots, kv_heads=1, head_dim=2, dtype=jnp.float32)
    return advance(cache, jnp.ones((1, written), jnp.int32))[1] if written else cache


def test_tokens_up_to_the_last_slot_fit_and_one_more_is_refused_naming_the_sizes():
    check_room(cache_after(3), 1)
    with pytest.raises(CacheOverflowError, match=r"holds 4 slots, 4 of them written: 1 more.*init_cache\(batch, "
                                                 r"max_length\).*at least 5"):
        advance(cache_after(4), jnp.ones((1, 1), jnp.int32))


def test_the_check_is_skipped_inside_a_compiled_program():
    """There the index is traced; `generate` sizes its own cache."""
    positions_1T = jax.jit(lambda cache: advance(cache, jnp.ones((1, 1), jnp.int32))[0])(cache_after(4))
    assert np.asarray(positions_1T).tolist() == [[4]]


def test_a_prefill_longer_than_the_cache_is_refused_by_decode():
    model = init_model(tiny_config(), seed=0)
    with pytest.raises(CacheOverflowError, match="holds 2 slots, 0 of them written: 3 more"):
        model.decode(jnp.asarray([[5, 6, 7]]), model.init_cache(1, 2))
