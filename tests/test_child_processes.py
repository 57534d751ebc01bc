"""The suite's child processes start without PyTorch (tests/without_torch, set up by tests/conftest.py), as
a process of easytrain's runtime install would; the test processes keep it for the interop tests."""

import importlib.metadata
import importlib.util
import json
import os
import subprocess
import sys

import pytest

from runs import child_env

PROBE = """
import importlib.util, json, sys
import datasets, transformers
from transformers import LlamaConfig
LlamaConfig()
print(json.dumps({"found": importlib.util.find_spec("torch") is not None, "imported": "torch" in sys.modules,
                  "transformers": transformers.utils.is_torch_available(),
                  "datasets": datasets.config.TORCH_AVAILABLE}))
"""


def torch_installed() -> bool:
    try:
        importlib.metadata.distribution("torch")
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


def probe() -> dict[str, bool]:
    done = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, env=child_env(), timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.splitlines()[-1])


def test_a_child_process_neither_finds_nor_imports_pytorch():
    assert probe() == {"found": False, "imported": False, "transformers": False, "datasets": False}


def test_a_child_that_needs_pytorch_asks_for_it(children_with_torch):
    if not torch_installed():
        pytest.skip("PyTorch is not installed")
    assert probe() == {"found": True, "imported": True, "transformers": True, "datasets": True}


def test_the_test_process_keeps_pytorch_where_it_is_installed():
    """Else every interop test would skip instead of run (`pytest.importorskip("torch")`)."""
    assert (importlib.util.find_spec("torch") is not None) == torch_installed()


def test_the_sitecustomize_it_shadows_still_runs(tmp_path):
    """Some Python distributions ship their own sitecustomize; tests/without_torch's runs it after hiding PyTorch."""
    (tmp_path / "sitecustomize.py").write_text("import builtins\nbuiltins.OTHER_SITECUSTOMIZE_RAN = True\n")
    env = child_env()
    env["PYTHONPATH"] += os.pathsep + str(tmp_path)
    code = "import builtins, importlib.util; print(builtins.OTHER_SITECUSTOMIZE_RAN, importlib.util.find_spec('torch'))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.split() == ["True", "None"]


MAPS = """
import json, transformers, transformers.models
from transformers import LlamaConfig
from transformers.utils.import_utils import define_import_structure
models = transformers.models.__file__
print(json.dumps([sorted(transformers._class_to_module.items()), sorted(transformers._modules),
                  sorted(transformers.models._modules), sorted(transformers.models.llama._class_to_module.items()),
                  define_import_structure(models) is define_import_structure(models, None)]))
"""


def lazy_names(where: str) -> list:
    """What a child's transformers imports lazily, read from (and stored in) the maps at `where`; '': none kept."""
    env = {**child_env(), "EASYTRAIN_TESTS_TRANSFORMERS_IMPORT_MAPS": where}
    done = subprocess.run([sys.executable, "-c", MAPS], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.splitlines()[-1])


@pytest.fixture(scope="module")
def own_names() -> list:
    """A child that builds its own maps, as transformers does: each call of its own, a call again the same object."""
    own = lazy_names("")
    assert ["LlamaConfig", "models.llama.configuration_llama"] in own[0] and own[-1] is False
    return own


def test_children_read_transformers_import_maps_as_transformers_builds_them(tmp_path, own_names):
    """A child builds transformers' lazy-import maps and stores them for the test run (tests/conftest.py); the next
    loads them: both get the names and modules of a child that builds its own."""
    maps = tmp_path / "maps.pickle"
    assert own_names == lazy_names(str(maps))
    stored = maps.stat().st_mtime_ns
    assert own_names == lazy_names(str(maps)) and maps.stat().st_mtime_ns == stored, "the second child built them again"


@pytest.mark.parametrize("where", ["missing/maps.pickle", "unreadable.pickle"])
def test_a_child_that_cannot_keep_or_read_the_maps_builds_its_own(tmp_path, own_names, where):
    """A file that cannot be written (its directory gone, a full disk) or read (not a pickle this Python reads)
    leaves a child building its maps, as without one, not failing at `import transformers`."""
    (tmp_path / "unreadable.pickle").write_bytes(b"\x80\x63 not a pickle this Python reads")
    assert own_names == lazy_names(str(tmp_path / where))


def test_a_test_run_never_names_an_earlier_runs_files(monkeypatch):
    """A killed run leaves its compilation cache and import maps behind; a later run whose process gets the same id
    (ids are reused) reads neither: an earlier transformers' maps would give the names of another version."""
    from conftest import of_this_run

    monkeypatch.setattr(os, "getpid", lambda: 4242)
    assert of_this_run("easytrain-xla") != of_this_run("easytrain-xla")
    assert os.path.basename(of_this_run("easytrain-xla")).startswith("easytrain-xla-pid4242-")


COMPILES = """
import importlib._bootstrap_external as bootstrap, json, sys
compiled = []
source_to_code = bootstrap.SourceLoader.source_to_code
bootstrap.SourceLoader.source_to_code = lambda self, data, path, **kw: (compiled.append(path.rsplit("/", 1)[-1]),
                                                                        source_to_code(self, data, path, **kw))[1]
import package.first, package.second
print(json.dumps([package.first.VALUE, package.second.VALUE, compiled]))
"""


def test_a_precompiled_package_is_read_not_compiled_and_an_edited_module_is_compiled_afresh(tmp_path):
    """tests/conftest.py `precompile`: a child that writes no bytecode compiles none of the package's modules; one
    edited since (to the same size, within the same second) runs its new source, and only it is compiled again."""
    from conftest import precompile

    package = tmp_path / "package"
    package.mkdir()
    for name in ("__init__", "first", "second"):
        (package / f"{name}.py").write_text(f"VALUE = '{name[:5]}'\n")

    def child() -> list:
        env = {**os.environ, "PYTHONPATH": str(tmp_path), "PYTHONDONTWRITEBYTECODE": "1"}
        done = subprocess.run([sys.executable, "-c", COMPILES], capture_output=True, text=True, env=env, timeout=60)
        assert done.returncode == 0, done.stderr[-3000:]
        return json.loads(done.stdout)

    assert precompile(package) == 3 and precompile(package) == 0
    assert child() == ["first", "secon", []]
    (package / "first.py").write_text("VALUE = 'FIRST'\n")
    assert child() == ["FIRST", "secon", ["first.py"]]
    assert precompile(package) == 1 and child() == ["FIRST", "secon", []]
