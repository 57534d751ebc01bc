"""The test processes' loaded-executable memo (tests/loaded_executables.py): an identical program is loaded
once per process, never onto other devices, never from another cache directory, never with host callbacks."""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax._src import compilation_cache as jax_cache

from runs import child_env, xla_flags

TESTS_DIR = Path(__file__).resolve().parent


@pytest.fixture
def loads(monkeypatch):
    """Count the executables JAX deserialises from its persistent cache."""
    calls = []
    original = jax_cache.get_executable_and_time

    def counted(*args, **kwargs):
        result = original(*args, **kwargs)
        calls.append(result[0] is not None)
        return result

    monkeypatch.setattr(jax_cache, "get_executable_and_time", counted)
    return calls


def program(scale: float):
    """A new function object each call, so `jax.jit` traces and lowers it again: the same HLO for one scale."""
    return jax.jit(lambda x: jnp.tanh(x) * scale + jnp.cumsum(x))


def test_an_identical_program_is_loaded_once_per_process(loads):
    x = jnp.arange(64.0)
    expected = np.tanh(np.arange(64.0)) * 1.25 + np.cumsum(np.arange(64.0))
    first = program(1.25)(x)  # compiled (or, if an earlier test compiled it, loaded) and kept
    again = [program(1.25)(x) for _ in range(3)]
    assert loads.count(True) <= 1, "deserialised again"
    for result in [first, *again]:
        np.testing.assert_allclose(result, expected, rtol=1e-6)


def test_another_cache_directory_starts_empty(loads, tmp_path):
    x = jnp.arange(64.0)
    program(2.5)(x)
    loads.clear()
    previous = jax.config.jax_compilation_cache_dir
    jax.config.update("jax_compilation_cache_dir", str(tmp_path / "other"))
    jax_cache.reset_cache()
    try:
        program(2.5)(x)
        assert loads == [False] and list((tmp_path / "other").iterdir()), "looked up, missed, compiled, written"
    finally:
        jax.config.update("jax_compilation_cache_dir", previous)
        jax_cache.reset_cache()


def test_a_program_with_a_host_callback_calls_its_own():
    seen = []

    def traced(tag: str):
        def step(x):
            jax.debug.callback(lambda v: seen.append((tag, float(v))), x.sum())
            return x + 1
        return jax.jit(step)

    x = jnp.ones(4)
    traced("first")(x)
    traced("second")(x)
    jax.effects_barrier()
    assert seen == [("first", 4.0), ("second", 4.0)]


DEVICES = textwrap.dedent("""
    import jax, jax.numpy as jnp
    import loaded_executables
    jax.config.update("jax_compilation_cache_dir", {cache!r})
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    loaded_executables.install()
    for device in jax.devices()[:2] * 2:
        x = jax.device_put(jnp.arange(8.0), device)
        y = jax.jit(lambda v: v * 3.0)(x)  # a new function each time: the same HLO and cache key everywhere
        assert y.devices() == {{device}}, (y.devices(), device)
        assert float(y.sum()) == 84.0
    print("ok")
""")


def test_the_same_program_on_other_devices_gets_its_own_executable(tmp_path):
    """JAX's cache key names device kinds, not devices: the memo keys by devices too."""
    code = DEVICES.format(cache=str(tmp_path / "cache"))
    env = child_env(XLA_FLAGS=xla_flags(2))
    env["PYTHONPATH"] += os.pathsep + str(TESTS_DIR)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.split() == ["ok"]
