"""Started by the tests' child processes (this directory is on their PYTHONPATH, tests/conftest.py): PyTorch,
which the test extra installs for the interop tests, is hidden from every import in the process.

easytrain's runtime install has no PyTorch, so the children run as a user's process would. Without this,
every child that builds a `transformers` config imports PyTorch through it (about 3 s of CPU each).
The path finder, not `sys.modules["torch"] = None`, hides it: with that, `"torch" in sys.modules` holds and
`datasets` then imports it to fingerprint a function. Here `importlib.util.find_spec("torch")` is None, as
where PyTorch is not installed, so `transformers` and `datasets` both treat it as absent. It also sets the cyclic
collector's thresholds the test processes run with (below).
"""

import gc
import importlib.util
import os
import sys
from importlib.machinery import PathFinder

HIDDEN = "torch"


class _PathFinderWithoutTorch(PathFinder):
    @classmethod
    def find_spec(cls, fullname, path=None, target=None):
        if fullname == HIDDEN or fullname.startswith(HIDDEN + "."):
            return None
        return super().find_spec(fullname, path, target)


sys.meta_path[sys.meta_path.index(PathFinder)] = _PathFinderWithoutTorch


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
