"""Smoke test of benchmarks/compile_cache.py at its quick size (no timing asserted)."""

import json
import subprocess
import sys

from benchmarks import compile_cache
from runs import ROOT, child_env


def test_compile_cache_benchmark_smoke(tmp_path):
    out = tmp_path / "compile_cache.json"
    result = compile_cache.main(["--quick", "--out", str(out)])
    assert json.loads(out.read_text()) == result
    assert set(result["first_step_compile_seconds"]) == {"off", "cold", "warm"}
    assert all(seconds > 0 for values in result["first_step_compile_seconds"].values() for seconds in values)
    assert result["warm_over_off"] > 0 and result["cold_over_off"] > 0


def test_a_bad_flag_fails_before_jax_is_imported():
    """benchmarks/run.py's smoke test makes this benchmark fail on a bad flag as the cheap failure of its suite: it
    must refuse the flag before importing JAX (benchmarks.report imports easytrain's memory plans only when asked)."""
    code = ("import sys\nfrom benchmarks import compile_cache\ntry:\n    compile_cache.main(['--repeats', 'x'])\n"
            "except SystemExit as exit:\n    print(exit.code, sorted({'jax', 'transformers'} & set(sys.modules)))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, env=child_env())
    assert done.stdout.strip() == "2 []", done.stderr[-2000:]
