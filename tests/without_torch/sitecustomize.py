"""Started by the tests' child processes (this directory is on their PYTHONPATH, tests/conftest.py): PyTorch,
which the test extra installs for the interop tests, is hidden from every import in the process; and transformers'
map of its lazily imported names is read from the test run's copy (below).

easytrain's runtime install has no PyTorch, so the children run as a user's process would. Without this,
every child that builds a `transformers` config imports PyTorch through it (about 3 s of CPU each).
The path finder, not `sys.modules["torch"] = None`, hides it: with that, `"torch" in sys.modules` holds and
`datasets` then imports it to fingerprint a function. Here `importlib.util.find_spec("torch")` is None, as
where PyTorch is not installed, so `transformers` and `datasets` both treat it as absent. It also sets the cyclic
collector's thresholds the test processes run with (below).
"""

import contextlib
import functools
import gc
import importlib.util
import os
import pickle
import sys
import tempfile
from importlib.machinery import PathFinder

HIDDEN = "torch"


class _PathFinderWithoutTorch(PathFinder):
    @classmethod
    def find_spec(cls, fullname, path=None, target=None):
        if fullname == HIDDEN or fullname.startswith(HIDDEN + "."):
            return None
        return super().find_spec(fullname, path, target)


sys.meta_path[sys.meta_path.index(PathFinder)] = _PathFinderWithoutTorch

#: Where the test run keeps transformers' import maps for its children (tests/conftest.py); unset: none kept.
IMPORT_MAPS = os.path.abspath(os.environ["EASYTRAIN_TESTS_TRANSFORMERS_IMPORT_MAPS"]) if os.environ.get(
    "EASYTRAIN_TESTS_TRANSFORMERS_IMPORT_MAPS") else None


def _read_maps() -> dict:
    """The stored maps, each pickled apart, by (absolute path, prefix); none where the file is missing or cannot be
    read, whatever the reason (then a child builds its own, as without the file)."""
    try:
        with open(IMPORT_MAPS, "rb") as file:
            maps = pickle.load(file)
    except Exception:  # a missing file, another Python's pickle protocol, a foreign file: build them
        return {}
    return maps if isinstance(maps, dict) else {}


def _store(key: tuple, stored: bytes) -> None:
    """Adds one map to the file, whole or not at all (a new file replaces it, for a child reading it meanwhile). A
    file that cannot be written (its directory gone, a full disk) leaves the map unstored, not the import failed."""
    temporary = None
    try:
        with tempfile.NamedTemporaryFile(dir=os.path.dirname(IMPORT_MAPS), prefix=os.path.basename(IMPORT_MAPS),
                                         delete=False) as file:
            temporary = file.name
            pickle.dump({**_read_maps(), key: stored}, file)
        os.replace(temporary, IMPORT_MAPS)
    except OSError:
        if temporary is not None:
            with contextlib.suppress(OSError):
                os.unlink(temporary)


def _stored_once(define):
    """`define_import_structure` read from `IMPORT_MAPS`, computed by `define` (and added there) when missing.

    `import transformers` reads the `__all__` of its 1 600 model files to build its map of what to import lazily
    (0.55 s of a child's 1.0 s of CPU in that import); every child of a test run reads the same files, so the first
    to need a map computes it and the others load it. A map is a function of the files under its path alone
    (transformers asks no backend's availability while building it), so a child that hides PyTorch and one that
    does not would build the same; a map of another installation is under another path. Each is stored as `define`
    returns it, before its caller adds to it, and each call unpickles its own copy: with `lru_cache`, one object per
    call form in a process, as transformers' own cache gives.
    """
    stored: dict[tuple, bytes] = {}

    @functools.lru_cache
    def define_import_structure(module_path, prefix=None):
        key = (os.path.abspath(module_path), prefix)
        if key not in stored:
            stored.update(_read_maps())
        if key not in stored:
            stored[key] = pickle.dumps(define(module_path, prefix))
            _store(key, stored[key])
        return pickle.loads(stored[key])

    return define_import_structure


class _TransformersImportMaps:
    """Finds `transformers.utils.import_utils` as the path finder does; once run, its `define_import_structure`
    is `_stored_once`."""

    @classmethod
    def find_spec(cls, fullname, path=None, target=None):
        if fullname != "transformers.utils.import_utils":
            return None
        spec = PathFinder.find_spec(fullname, path, target)
        if spec is None or spec.loader is None:
            return spec
        execute = spec.loader.exec_module

        def exec_module(module):
            execute(module)
            if callable(define := getattr(module, "define_import_structure", None)):  # absent: nothing stored
                module.define_import_structure = _stored_once(define)

        spec.loader.exec_module = exec_module
        return spec


if IMPORT_MAPS:
    sys.meta_path.insert(0, _TransformersImportMaps)


def _run_the_sitecustomize_this_one_shadows() -> None:
    """The interpreter's own sitecustomize (some distributions ship one), found further along sys.path."""
    here = os.path.dirname(os.path.abspath(__file__))
    rest = [entry for entry in sys.path if os.path.abspath(entry or os.curdir) != here]
    spec = PathFinder.find_spec("sitecustomize", rest)
    if spec is not None and spec.loader is not None:
        spec.loader.exec_module(importlib.util.module_from_spec(spec))


_run_the_sitecustomize_this_one_shadows()

# The collector's thresholds of the test processes (tests/conftest.py `GC_THRESHOLDS`, where the measurement is): a
# tiny `easytrain train` child spent 0.76-0.79 s of its 5.8-6.2 s of CPU in collections at Python's defaults, 0.22 s
# at these. When the collector runs changes no result.
gc.set_threshold(10_000, 20, 10)
