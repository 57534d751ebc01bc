"""`pip install easytrain` alone (no extras) installs every third-party module easytrain imports when its own
modules load: the README's main command runs without the test extras, which install much more."""

import ast
import importlib.metadata as metadata
import sys
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

PACKAGE = Path(__file__).resolve().parents[1] / "easytrain"


def runtime_distributions() -> set[str]:
    """easytrain's runtime requirements and, recursively, theirs (markers evaluated here, no extras)."""
    pending = [Requirement(text) for text in metadata.requires("easytrain") or []]
    found: set[str] = set()
    while pending:
        requirement = pending.pop()
        if requirement.marker and not requirement.marker.evaluate({"extra": ""}):
            continue
        name = canonicalize_name(requirement.name)
        if name in found:
            continue
        found.add(name)
        try:
            pending += [Requirement(text) for text in metadata.requires(name) or []]
        except metadata.PackageNotFoundError:
            continue
    return found


def imported_when_loaded(tree: ast.Module) -> set[str]:
    """Top-level names of the modules a file imports as it loads: module-level statements, outside functions,
    classes, `if TYPE_CHECKING:` blocks and `try:` blocks (an optional import handles its absence)."""
    names: set[str] = set()
    for node in tree.body:
        if isinstance(node, ast.Import):
            names |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


def test_every_module_level_import_is_a_runtime_dependency():
    providers = metadata.packages_distributions()
    runtime = runtime_distributions()
    missing = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        for module in imported_when_loaded(ast.parse(path.read_text())):
            if module in sys.stdlib_module_names or module in ("easytrain", "__future__"):
                continue
            distributions = {canonicalize_name(name) for name in providers.get(module, [module])}
            if not distributions & runtime:
                missing.setdefault(module, []).append(str(path.relative_to(PACKAGE.parent)))
    assert not missing, f"imported at load time but not installed by `pip install easytrain`: {missing}"
