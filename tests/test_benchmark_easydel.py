"""benchmarks/easydel_peer.py without EasyDeL: a missing interpreter is a recorded error (exit 0), not a crash."""

import ast
import json
import os
import sys
from pathlib import Path
from unittest import mock

import pytest

from benchmarks import easydel_peer
from script_modules import load_script

ROOT = Path(__file__).resolve().parents[1]


def test_missing_interpreter_is_a_recorded_error(tmp_path):
    missing, out = tmp_path / "no-venv" / "bin" / "python", tmp_path / "peer.json"
    result = easydel_peer.main(["--python", str(missing), "--out", str(out)])
    assert json.loads(out.read_text()) == result
    assert result["benchmark"] == "easydel_peer" and result["python"] == str(missing)
    assert result["error"].startswith(f"EasyDeL venv not found: {missing}; create it with ")
    assert "pip install easydel" in result["error"]


def test_interpreter_from_environment(monkeypatch):
    monkeypatch.setenv("EASYDEL_PYTHON", "/elsewhere/python")
    assert easydel_peer.resolve_python(None) == "/elsewhere/python"
    assert easydel_peer.resolve_python("/flag/python") == "/flag/python"
    monkeypatch.delenv("EASYDEL_PYTHON")
    assert easydel_peer.resolve_python(None) == easydel_peer.DEFAULT_PYTHON


def test_runner_records_missing_venv(tmp_path, monkeypatch):
    """Through benchmarks/run.py: status ok, the error shown as the headline; not in the quick suite by default."""
    monkeypatch.setenv("EASYDEL_PYTHON", str(tmp_path / "absent"))
    sys.path.insert(0, str(ROOT))
    from benchmarks import run

    assert "easydel_peer" not in run.parse(["--suite", "quick"]).names
    assert "easydel_peer" in run.parse(["--suite", "full"]).names
    record = run.run_one(run.BENCHMARKS["easydel_peer"], "full", [], timeout=120, scratch=tmp_path)
    assert record["status"] == "ok" and record["returncode"] == 0, record
    assert "EasyDeL venv not found" in record["result"]["error"]
    (row,) = run.headlines({"easydel_peer": record})
    assert row.label.startswith("error: EasyDeL venv not found") and row.value is None


def test_peer_script_is_standalone():
    """It runs under EasyDeL's interpreter, where neither easytrain nor this repository is importable."""
    tree = ast.parse((ROOT / "benchmarks" / "peers" / "easydel_llama.py").read_text())
    imported = {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
    imported |= {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.module}
    assert not {name for name in imported if name.split(".")[0] in ("easytrain", "benchmarks", "tests")}
    assert {"easydel", "datasets"} <= imported


def load_peer_script():
    """The peer script as a module, without leaving the environment variables it sets for EasyDeL behind."""
    with mock.patch.dict(os.environ):
        return load_script("easydel_llama", ROOT / "benchmarks" / "peers" / "easydel_llama.py")


def test_peer_windows_are_timed_whole_as_easytrains_rounds():
    """EasyDeL's tokens/s is the median over windows of consecutive steps, as easytrain's side is measured: a
    slow step lowers its window, where the median of single steps would leave it out."""
    peer = load_peer_script()
    ends = [10.0, 11.0, 12.0, 15.0, 16.0, 17.0, 18.0, 19.0]  # when steps 1-8 ended: 1 compiles, 4 takes 3 s
    assert peer.window_rates(ends, warmup=1, window_steps=3, tokens_per_step=100) == [60.0, 100.0]
    assert peer.window_rates(ends, warmup=2, window_steps=3, tokens_per_step=100) == [60.0, 100.0]
    assert peer.window_rates(ends, warmup=1, window_steps=4, tokens_per_step=10) == [40 / 6]  # 3 steps left over
    assert peer.window_rates(ends, warmup=1, window_steps=1, tokens_per_step=1) == [1, 1, 1 / 3, 1, 1, 1, 1]


def test_both_sides_use_windows_of_the_same_length(monkeypatch, tmp_path):
    """The peer gets easytrain's round length as its window, and enough steps for one window at least."""
    commands = []
    monkeypatch.setattr(easydel_peer, "run_child", lambda command, timeout: commands.append(command) or {
        "tokens_per_second": 100.0, "trainer_tokens_per_second": 160.0, "trainer_compile_seconds": [1.0],
        "trainer_peak_rss_mib": [1.0]})
    python = tmp_path / "python"
    python.touch()
    result = easydel_peer.main(["--python", str(python), "--repeats", "1", "--steps_per_round", "7", "--steps", "21"])
    peer, ours = commands
    assert peer[peer.index("--window_steps") + 1] == "7" and peer[peer.index("--steps") + 1] == "21"
    assert ours[ours.index("--steps_per_round") + 1] == "7"
    assert result["ratio_easytrain_over_easydel"] == 1.6
    with pytest.raises(SystemExit):
        easydel_peer.main(["--python", str(python), "--steps", "5", "--steps_per_round", "10"])
