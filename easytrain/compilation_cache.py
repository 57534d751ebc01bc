"""JAX's persistent compilation cache for the trainer's steps: a resumed, restarted or repeated run loads
its compiled programs from disk instead of compiling them again.

The cache is JAX's own (`jax_compilation_cache_dir`), keyed by the program, the compiler options, the
devices and the jax version, so a hit is the executable XLA would have built. It is process-wide: JAX has
one cache, so the setting holds for every later compilation in the process. JAX only stores programs that
took at least `jax_persistent_cache_min_compile_time_secs` (1 s by default) to compile.

A cache the trainer turns on is capped at `DEFAULT_MAX_BYTES` (4 GiB) unless JAX is given a size: JAX itself keeps
every program it ever stored.

The directory must be trusted: whoever can write to it can make this process run their code (JAX's
warning), so the default is under the user's own cache directory, never a shared temporary one.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import jax
from jax.experimental.compilation_cache import compilation_cache

from easytrain.errors import ArgumentError

logger = logging.getLogger("easytrain")
AUTO = "auto"
#: Settings that leave JAX's own setting alone (a directory literally named so is written ./null).
UNSET = ("", "null", "none")
#: The size cap of a cache the trainer turns on, unless JAX is given one (`jax_compilation_cache_max_size`,
#: `JAX_COMPILATION_CACHE_MAX_SIZE`; -1 there is "no limit"): least recently used programs are evicted past it.
DEFAULT_MAX_BYTES = 4 * 2**30


def default_directory() -> Path:
    """``$XDG_CACHE_HOME/easytrain/xla``, ``~/.cache/easytrain/xla`` without it."""
    root = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(root) / "easytrain" / "xla"


def resolve(setting: str | None) -> str | None:
    """The directory `setting` asks for, or None to leave JAX's own setting alone.

    ``"auto"``: the directory JAX is already given (``JAX_COMPILATION_CACHE_DIR`` or jax.config), else
    `default_directory`; ``""``, None, or the words "null" / "none" (a quoted null in a file, never meant as a
    directory of that name): JAX's own setting (no cache unless it has one); a path: that path.
    """
    if setting is None or setting.strip().lower() in UNSET:
        return None
    if setting.strip() == AUTO:
        return jax.config.jax_compilation_cache_dir or str(default_directory())
    return str(Path(setting).expanduser())


def make_directory(setting: str | None) -> str | None:
    """Create the directory `enable` would point JAX at (None: it would leave JAX as it is), changing no setting:
    a trainer makes it inside the start every process agrees on (`start_agreement`), so a host that cannot is named
    on the others and a refused start changes nothing process-wide, then `use`s it once that start is agreed.
    Raises `ArgumentError` (field `compilation_cache_dir`) when the directory cannot be created."""
    if not jax.config.jax_enable_compilation_cache:
        return None
    directory = resolve(setting)
    if directory is None or directory == jax.config.jax_compilation_cache_dir:
        return None
    try:
        Path(directory).mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise ArgumentError("compilation_cache_dir", f"cannot create {directory!r} ({error}); give a writable "
                            "directory, or '' to compile without a persistent cache.") from error
    return directory


def enable(setting: str | None) -> str | None:
    """Point JAX's persistent cache at the directory `setting` asks for; returns the directory in use.

    Leaves JAX alone when its cache is switched off (``jax_enable_compilation_cache`` false). Raises
    `ArgumentError` (field `compilation_cache_dir`) when the directory cannot be created (`make_directory`).
    """
    return use(make_directory(setting))


def use(directory: str | None) -> str | None:
    """Point JAX's persistent cache at `directory`, which `make_directory` made (None: leave JAX's own setting);
    returns the directory in use (None where JAX's cache is switched off)."""
    if not jax.config.jax_enable_compilation_cache:
        return None
    if directory is None:
        return jax.config.jax_compilation_cache_dir
    cap_size()
    if jax.config.jax_compilation_cache_max_size != -1:
        date_unevictable_entries(Path(directory))
    compilation_cache.set_cache_dir(directory)
    # A compilation before this one (with no directory) settled "no cache" for the process; start over.
    compilation_cache.reset_cache()
    logger.info("XLA compilation cache: %s", directory)
    return directory


#: JAX's file names of a cache entry and of its last access time (`jax._src.lru_cache`).
_ENTRY_SUFFIX, _ACCESS_SUFFIX = "-cache", "-atime"


def date_unevictable_entries(directory: Path) -> None:
    """Give every entry of `directory` without an access-time file one (its modification time). JAX's eviction reads
    that file for every entry before each write, and a cache filled with no size cap never wrote them: under a cap
    every later write would fail, so the cache would store nothing new."""
    for entry in directory.glob(f"*{_ENTRY_SUFFIX}"):
        access = entry.with_name(entry.name.removesuffix(_ENTRY_SUFFIX) + _ACCESS_SUFFIX)
        if not access.exists():
            try:
                access.write_bytes(entry.stat().st_mtime_ns.to_bytes(8, "little"))
            except OSError as error:  # another process evicted it meanwhile, or a read-only cache: JAX copes
                logger.debug("could not date cache entry %s: %s", entry, error)


def cap_size() -> None:
    """`DEFAULT_MAX_BYTES` as JAX's cache size where nothing gave it one: JAX keeps every program by default, and each
    run that changes a shape, `max_steps` or the schedule adds one (tens of MiB each for a large model on an
    accelerator), so a cache used run after run would fill the disk. Eviction is JAX's (least recently used)."""
    if jax.config.jax_compilation_cache_max_size == -1 and "JAX_COMPILATION_CACHE_MAX_SIZE" not in os.environ:
        jax.config.update("jax_compilation_cache_max_size", DEFAULT_MAX_BYTES)
