"""`filter_logits` and `sample_logits` on logits of any leading shape ([V], [B, V], [B, T, V]), checked row by row
against a NumPy reference; and a temperature so small that `logits / temperature` overflows float32 still samples
its limit, the argmax, rather than the first token that overflowed to +inf."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from easytrain.sampling import filter_logits, sample_logits
from test_generation import numpy_keep  # the reference filter of one row


@pytest.mark.parametrize("shape", [(12,), (3, 12), (2, 3, 12)])
@pytest.mark.parametrize("top_k, top_p", [(1, None), (2, None), (5, None), (None, 0.5), (4, 0.6)])
def test_filter_logits_filters_each_row_of_any_leading_shape(shape, top_k, top_p):
    logits = np.random.RandomState(0).standard_normal(shape).astype(np.float32) * 2
    filtered = np.asarray(filter_logits(jnp.asarray(logits), top_k, top_p))
    assert filtered.shape == logits.shape
    for logits_V, got_V in zip(logits.reshape(-1, shape[-1]), filtered.reshape(-1, shape[-1])):
        keep_V = numpy_keep(logits_V, top_k, top_p)
        np.testing.assert_array_equal(np.isfinite(got_V), keep_V)
        np.testing.assert_array_equal(got_V[keep_V], logits_V[keep_V])


@pytest.mark.parametrize("shape", [(12,), (3, 12), (2, 3, 12)])
def test_sample_logits_draws_one_token_per_row_of_any_leading_shape(shape):
    logits = jnp.asarray(np.random.RandomState(1).standard_normal(shape).astype(np.float32))
    drawn = np.asarray(sample_logits(logits, jax.random.key(0), top_k=1))
    assert drawn.shape == shape[:-1] and drawn.dtype == np.int32
    np.testing.assert_array_equal(drawn, np.argmax(np.asarray(logits), axis=-1))


@pytest.mark.parametrize("temperature", [1e-30, 1e-38, 1e-40, 1e-46, 1e-300])
def test_a_temperature_too_small_for_float32_samples_the_argmax(temperature):
    logits_BV = jnp.asarray([[1.0, 5.0, 2.0, -3.0], [-4.0, -1.0, -2.0, -3.0], [0.0, -1.0, 0.5, 0.25]])
    for seed in range(20):
        drawn_B = np.asarray(sample_logits(logits_BV, jax.random.key(seed), temperature))
        np.testing.assert_array_equal(drawn_B, [1, 1, 2])


def test_a_tiny_temperature_draws_among_the_allowed_maxima_only():
    """Tied maxima stay equally likely (the limit of softmax(logits / t) as t -> 0); a token top_p drops stays out."""
    logits_V = jnp.asarray([3.0, 1.0, 3.0, 2.0])
    draws = {int(sample_logits(logits_V, jax.random.key(seed), 1e-40, top_k=2)) for seed in range(40)}
    assert draws == {0, 2}
    assert int(sample_logits(jnp.asarray([1.0, 9.0, 9.5]), jax.random.key(0), 1e-40, top_p=0.1)) == 2
