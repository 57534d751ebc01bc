"""Load a script (an example, a benchmark, a worker) that is not an importable module as a module of its own."""

import importlib.util
import sys
from pathlib import Path
from types import ModuleType


def load_script(name: str, path: Path, *, register: bool = False) -> ModuleType:
    """Execute the file at `path` as module `name`. `register` puts it in `sys.modules` first, as a script whose
    dataclasses or pickles look their module up by name needs."""
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    if register:
        sys.modules[name] = module
    spec.loader.exec_module(module)
    return module
