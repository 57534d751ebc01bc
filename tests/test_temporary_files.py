"""The suite and the benchmarks leave nothing behind in the temporary directory: a test run removes its XLA
compilation cache (tests/conftest.py), a benchmark its scratch output directories (benchmarks/report.py)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from runs import child_env

TESTS = Path(__file__).resolve().parent

COMPILES = """
import os

import jax


def test_compiles_into_the_run_cache():
    jax.jit(lambda x: x * 2)(1.0).block_until_ready()
    cache = os.environ["JAX_COMPILATION_CACHE_DIR"]
    assert cache.startswith(os.environ["TMPDIR"]) and os.listdir(cache)
"""


def fresh_run_env(tmp_path: Path) -> dict[str, str]:
    """A child environment as a new `pytest` command would start with: no cache of this run, no xdist worker."""
    env = child_env(TMPDIR=str(tmp_path))
    env["PYTHONPATH"] += os.pathsep + str(TESTS)  # the suite's conftest, loaded as a plugin
    return {k: v for k, v in env.items() if k != "JAX_COMPILATION_CACHE_DIR" and not k.startswith("PYTEST_XDIST")}


@pytest.mark.parametrize("workers", ["0", "2"])
def test_a_test_run_removes_its_compilation_cache(tmp_path, workers):
    (tmp_path / "test_inner.py").write_text(COMPILES)
    done = subprocess.run([sys.executable, "-m", "pytest", "-p", "conftest", "-p", "no:cacheprovider", "-n", workers,
                           "-q", "test_inner.py"], cwd=tmp_path, capture_output=True, text=True,
                          env=fresh_run_env(tmp_path), timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "1 passed" in done.stdout
    assert not list(tmp_path.glob("easytrain-xla-*"))


SCRATCH = """
from pathlib import Path

from benchmarks.report import scratch_dir

scratch = Path(scratch_dir("easytrain-bench-"))
(scratch / "checkpoints").mkdir()
(scratch / "checkpoints" / "state").write_text("saved")
print(scratch)
"""


def test_a_benchmark_scratch_directory_is_gone_when_its_process_ends(tmp_path):
    done = subprocess.run([sys.executable, "-c", SCRATCH], capture_output=True, text=True,
                          env=child_env(TMPDIR=str(tmp_path)), timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    scratch = Path(done.stdout.split()[-1])
    assert scratch.parent == tmp_path and scratch.name.startswith("easytrain-bench-")
    assert not scratch.exists()
