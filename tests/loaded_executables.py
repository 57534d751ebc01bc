"""A test process keeps its compiled programs loaded for the next identical one (installed by tests/conftest.py).

The suite builds hundreds of trainers that compile the same few programs. The test run's persistent compilation
cache spares their compilation but not their loading: XLA:CPU deserialises every hit again, 0.3-0.5 s for a
test-sized train step, as long as tracing and lowering it. This keeps the executables of the process's last
`SIZE` cache entries and hands them out again, keyed by JAX's cache key, the cache directory (jax 0.10's key
changes with it, jax 0.11's does not) and the devices (JAX's key leaves the device assignment out on GPU).
Every entry's first load still takes JAX's own path, and a program with host callbacks is never kept (JAX does
not cache those either: the callbacks are baked into the executable).
"""

from __future__ import annotations

import collections
import time
from typing import Any

import jax
from jax._src import compiler

SIZE = 128

#: The kept executables by `install`'s key, the least recently used first.
loaded: collections.OrderedDict[tuple, tuple[Any, int]] = collections.OrderedDict()


def forget() -> None:
    """Drop every kept executable: the next identical program is read from the persistent cache, as in a new
    process (for a test of that read)."""
    loaded.clear()


def install(size: int = SIZE) -> None:
    """Wrap JAX's persistent-cache read and write in this process (a no-op where JAX lacks them)."""
    read, compile_ = getattr(compiler, "_cache_read", None), getattr(compiler, "_compile_and_write_cache", None)
    if read is None or compile_ is None:
        return

    def key(cache_key: str, devices: Any) -> tuple:
        return cache_key, jax.config.jax_compilation_cache_dir, tuple(device.id for device in devices)

    def keep(entry: tuple, executable: Any, compile_time: int) -> None:
        loaded[entry] = executable, compile_time
        loaded.move_to_end(entry)
        while len(loaded) > size:
            loaded.popitem(last=False)

    def cached_read(module_name, cache_key, compile_options, backend, executable_devices, *host_callbacks):
        # jax 0.11 passes the host callbacks too (it may cache such programs); a program with any is not kept
        callbacks = host_callbacks[0] if host_callbacks else ()
        entry = key(cache_key, executable_devices)
        if entry in loaded and not callbacks:
            loaded.move_to_end(entry)
            return loaded[entry]
        executable, compile_time = read(module_name, cache_key, compile_options, backend, executable_devices,
                                        *host_callbacks)
        if executable is not None and not callbacks:
            keep(entry, executable, compile_time)
        return executable, compile_time

    def compiled_and_kept(backend, computation, executable_devices, compile_options, host_callbacks, module_name,
                          cache_key):
        started = time.monotonic()
        executable = compile_(backend, computation, executable_devices, compile_options, host_callbacks, module_name,
                              cache_key)
        if not host_callbacks:
            keep(key(cache_key, executable_devices), executable, int(time.monotonic() - started))
        return executable

    compiler._cache_read, compiler._compile_and_write_cache = cached_read, compiled_and_kept
