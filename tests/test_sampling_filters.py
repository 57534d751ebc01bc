"""`sample_logits` divides by the temperature before top-k/top-p filter, as transformers orders its warpers: the
nucleus is that of the tempered distribution. Filtering first keeps another set whenever the temperature is not 1
(a low temperature sharpens the distribution, so fewer tokens hold `top_p` of it), and no test with a temperature of
1 or without top-p could tell."""

import jax
import numpy as np
import pytest

from easytrain.sampling import sample_logits
from test_generation import numpy_keep  # the reference filter of one row

LOGITS = np.array([2.0, 1.5, 1.0, 0.0, -1.0], np.float32)
DRAWS = 4000


def reference(logits_V: np.ndarray, temperature: float, top_p: float) -> np.ndarray:
    """softmax(filter(logits / temperature)) in NumPy: the distribution each draw follows."""
    tempered_V = logits_V.astype(np.float64) / temperature
    weights_V = np.where(numpy_keep(tempered_V, None, top_p), np.exp(tempered_V - tempered_V.max()), 0.0)
    return weights_V / weights_V.sum()


@pytest.mark.parametrize("temperature, top_p", [(0.5, 0.6), (2.0, 0.65)])
def test_sampled_frequencies_follow_the_tempered_nucleus(temperature, top_p):
    expected = reference(LOGITS, temperature, top_p)
    filtered_first = reference(LOGITS, 1.0, top_p) > 0  # the nucleus of the untempered logits
    assert not np.array_equal(expected > 0, filtered_first), "the case must tell the two orders apart"
    keys = jax.random.split(jax.random.key(0), DRAWS)
    drawn = np.asarray(jax.vmap(lambda key: sample_logits(LOGITS, key, temperature=temperature, top_p=top_p))(keys))
    frequencies = np.bincount(drawn, minlength=len(LOGITS)) / DRAWS
    assert set(np.flatnonzero(frequencies)) <= set(np.flatnonzero(expected)), (frequencies, expected)
    np.testing.assert_allclose(frequencies, expected, atol=0.03)  # 4000 draws: a standard error under 0.008
