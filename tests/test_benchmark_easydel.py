"""benchmarks/easydel_peer.py without EasyDeL: a missing interpreter is a recorded error (exit 0), not a crash."""

import ast
import json
import sys
from pathlib import Path

from benchmarks import easydel_peer

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
