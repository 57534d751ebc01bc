"""Small leaves digested in NumPy (`integrity.fingerprint(tree, host_elements)`) give the device digests' values,
so a record taken on the host checks against one taken on device (another process count, a larger threshold)."""

import jax
import numpy as np

from easytrain import integrity
from test_integrity import reference, samples


def test_host_digests_equal_the_device_digests_and_compile_nothing(monkeypatch):
    state = samples()
    on_device = integrity.fingerprint(state)
    digested = []
    monkeypatch.setattr(integrity, "_digest", lambda leaf: digested.append(leaf.shape) or integrity._leaf_digest(
        leaf, *integrity._digest_plan(leaf)))
    on_host = integrity.fingerprint(state, host_elements=integrity.SMALL_ON_HOST)
    assert on_host == on_device == {name: reference(leaf) for name, leaf in state.items()}
    assert digested == [state["key"].shape], "only the PRNG keys are digested on device"


def test_host_digests_see_a_changed_or_moved_value():
    rng = np.random.default_rng(1)
    values = rng.standard_normal((16, 8), dtype=np.float32)
    swapped = values.copy()
    swapped[[0, 1]] = swapped[[1, 0]]
    changed = values.copy()
    changed[3, 5] = np.nextafter(changed[3, 5], np.float32(np.inf))
    digests = [integrity.fingerprint({"w": jax.numpy.asarray(v)}, host_elements=integrity.SMALL_ON_HOST)["w"]
               for v in (values, swapped, changed)]
    assert digests[1][0] == digests[0][0] and digests[1][1] != digests[0][1], "a moved row changes the weighted sum"
    assert digests[2][0] != digests[0][0] and digests[2][1] != digests[0][1]


def test_leaves_above_the_threshold_stay_on_device(monkeypatch):
    leaf = jax.numpy.ones((integrity.SMALL_ON_HOST + 1,), jax.numpy.float32)
    monkeypatch.setattr(integrity, "_host_digest", lambda leaf: (_ for _ in ()).throw(AssertionError("on host")))
    assert integrity.fingerprint({"w": leaf}, host_elements=integrity.SMALL_ON_HOST) == {"w": reference(leaf)}


def test_numpy_leaves_are_digested_where_they_lie_to_the_device_values(monkeypatch):
    """A NumPy leaf (a reference model's weights read back, a scalar) is on the host already: it is digested there
    at any threshold, to the values its device copy gives, with nothing compiled."""
    rng = np.random.default_rng(2)
    state = {"float32": rng.standard_normal((6, 4), dtype=np.float32), "bool": rng.random((3, 5)) < 0.5,
             "float64": rng.standard_normal((5,)), "int64": np.arange(-3, 4), "scalar": np.float32(-3.25),
             "bfloat16": rng.standard_normal((2, 3)).astype(jax.numpy.bfloat16),
             "large": np.ones((integrity.SMALL_ON_HOST + 1,), np.float32)}
    expected = integrity.fingerprint({name: jax.numpy.asarray(leaf) for name, leaf in state.items()})
    monkeypatch.setattr(integrity, "_digest", lambda leaf: (_ for _ in ()).throw(AssertionError("on device")))
    for host_elements in (integrity.SMALL_ON_HOST, 0):
        assert integrity.fingerprint(state, host_elements) == expected == {
            name: reference(leaf) for name, leaf in state.items()}
