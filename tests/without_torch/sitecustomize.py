"""Started by the tests' child processes (this directory is on their PYTHONPATH, tests/conftest.py): PyTorch,
which the test extra installs for the interop tests, is hidden from every import in the process.

easytrain's runtime install has no PyTorch, so the children run as a user's process would. Without this,
every child that builds a `transformers` config imports PyTorch through it (about 3 s of CPU each).
The path finder, not `sys.modules["torch"] = None`, hides it: with that, `"torch" in sys.modules` holds and
`datasets` then imports it to fingerprint a function. Here `importlib.util.find_spec("torch")` is None, as
where PyTorch is not installed, so `transformers` and `datasets` both treat it as absent.
"""

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
