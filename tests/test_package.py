"""`import easytrain` is cheap, and the `easytrain` command imports JAX and the rest once, after relaunching."""

from __future__ import annotations

import ast
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import easytrain
from runs import RELAUNCHES_FOR_HUGE_PAGES, env_without_huge_pages

HEAVY = ("jax", "transformers", "datasets", "orbax.checkpoint", "easytrain.trainers")


def run_python(code: str, **env: str) -> subprocess.CompletedProcess:
    done = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          env=env_without_huge_pages(**env), timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def test_importing_the_package_loads_no_framework_until_a_name_is_used() -> None:
    done = run_python(f"""
        import sys
        import easytrain
        print(sorted(m for m in {HEAVY!r} if m in sys.modules))
        from easytrain import BaseTrainer, TrainingArguments
        print(BaseTrainer.__module__, TrainingArguments.__module__)
    """)
    before, names = done.stdout.splitlines()[-2:]
    assert before == "[]"
    assert names == "easytrain.trainers.base easytrain.arguments"


def test_every_exported_name_is_the_defining_modules_own_and_typed_alike() -> None:
    for name in easytrain.__all__:
        value = getattr(easytrain, name)
        assert getattr(sys.modules[easytrain._EXPORTS[name]], name) is value, name
        assert name in dir(easytrain)
    with pytest.raises(AttributeError, match="no attribute 'Trainer'"):
        easytrain.Trainer  # noqa: B018
    # The TYPE_CHECKING imports (what editors and type checkers see) name exactly the lazily loaded names.
    tree = ast.parse(Path(easytrain.__file__).read_text())
    guarded = next(node for node in tree.body if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test))
    typed = {alias.asname or alias.name: node.module for node in guarded.body for alias in node.names}
    assert typed == easytrain._EXPORTS
    assert sorted(easytrain.__all__) == sorted(easytrain._EXPORTS)


COMMAND = """
    import os, runpy, sys
    def exec_instead(path, argv, env):  # report what the first process had imported when it relaunched
        print("relaunched", sorted(m for m in {heavy!r} if m in sys.modules), flush=True)
        os._exit(0)
    os.execve = exec_instead
    sys.argv = ["easytrain", "train", "--help"]
    {start}
    print("ran without relaunching")
"""
STARTS = {
    "console script": "import importlib.metadata as m; "
                      "next(iter(m.entry_points(group='console_scripts', name='easytrain'))).load()()",
    "python -m easytrain": "runpy.run_module('easytrain', run_name='__main__')",
}


@pytest.mark.skipif(not RELAUNCHES_FOR_HUGE_PAGES,
                    reason="the command relaunches only with Linux, glibc 2.35+, THP madvise")
@pytest.mark.parametrize("start", STARTS.values(), ids=STARTS.keys())
def test_the_command_relaunches_before_importing_jax_and_the_rest(start: str) -> None:
    """Relaunching replaces the process: whatever it imported before is imported again (2-5 s per start)."""
    done = run_python(COMMAND.format(heavy=HEAVY, start=start))
    assert done.stdout.splitlines()[-1] == "relaunched []"


def test_transformers_advice_about_a_missing_pytorch_is_not_shown() -> None:
    """Without PyTorch (easytrain's runtime install) transformers says "Models won't be available" on import:
    untrue for easytrain, whose models are its own."""
    done = run_python("""
        import sys
        sys.modules["torch"] = None  # as if PyTorch were not installed
        import easytrain
        from easytrain import BaseTrainer
        from transformers import AutoTokenizer, LlamaConfig
    """)
    assert "PyTorch was not found" not in done.stderr, done.stderr
