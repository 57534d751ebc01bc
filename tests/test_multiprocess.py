"""Two processes x 4 CPU devices on localhost behave like one process with 8 devices."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from runs import xla_flags

ROOT = Path(__file__).resolve().parents[1]
WORKER = ROOT / "tests" / "workers" / "mesh_equivalence.py"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(devices_per_process: int, processes: int, *worker_args: str) -> list[dict]:
    port = free_port()
    base = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
            "JAX_PLATFORMS": "cpu", "XLA_FLAGS": xla_flags(devices_per_process)}
    procs = []
    for index in range(processes):
        env = dict(base)
        if processes > 1:
            env["EASYTRAIN_TEST_PROCESSES"] = f"127.0.0.1:{port},{processes},{index}"
        procs.append(subprocess.Popen([sys.executable, str(WORKER), *worker_args], env=env, text=True,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE))
    results = []
    for proc in procs:
        out, err = proc.communicate(timeout=600)
        assert proc.returncode == 0, err[-3000:]
        results.append(json.loads(out.strip().splitlines()[-1]))
    return results


@pytest.fixture(scope="module")
def single() -> dict:
    """One process with 8 devices on (8,1,1): 5 steps, then evaluate() with the exact-match evaluator."""
    (result,) = launch(8, 1, "8", "1", "1", "8", "--evaluate")
    return result


@pytest.mark.slow
def test_two_processes_match_one_process_with_eight_devices(tmp_path, single):
    """Same losses; and evaluate(), generation included, gives both processes the single-process metrics."""
    first, second = launch(4, 2, "8", "1", "1", "8", "--output-dir", str(tmp_path / "run"), "--evaluate")
    assert (first["process"], second["process"]) == (0, 1)
    assert len({tuple(row) for row in single["sampled"]}) > 16, "samples too uniform to compare generation"
    for result in (first, second):
        assert result["losses"] == pytest.approx(single["losses"], abs=1e-5, rel=1e-5)
        assert result["sampled"] == result["sampled_under_mesh"] == single["sampled"]
        assert result["eval"]["eval_exact_match"] == single["eval"]["eval_exact_match"]
        assert result["eval"]["eval_loss"] == pytest.approx(single["eval"]["eval_loss"], rel=1e-5)
    for step, (a, b, whole) in enumerate(zip(first["example_ids"], second["example_ids"], single["example_ids"])):
        assert not set(a) & set(b), f"step {step}: both processes read the same example"
        assert a + b == whole, f"step {step}: together they read exactly the single-process batch"
    assert "metrics.jsonl" in first["written"] and "arguments.json" in first["written"]
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == [1, 2, 3, 4, 5], "only process 0 logs, once per step"


@pytest.mark.slow
def test_two_processes_checkpoint_and_resume_together(tmp_path, single):
    """Both processes write one checkpoint at step 3, then both restore it and continue the curve."""
    run_dir = str(tmp_path / "run")
    stopped = launch(4, 2, "8", "1", "1", "8", "--output-dir", run_dir, "--stop-at", "3")
    assert (tmp_path / "run" / "checkpoints" / "3").is_dir()
    resumed = launch(4, 2, "8", "1", "1", "8", "--output-dir", run_dir, "--resume")
    for result in stopped:
        assert result["losses"] == pytest.approx(single["losses"][:3], abs=1e-5, rel=1e-5)
    for result in resumed:
        assert result["losses"] == pytest.approx(single["losses"][3:], abs=1e-5, rel=1e-5)


@pytest.mark.slow
def test_two_processes_resume_stacked_layers_into_separate_ones(tmp_path, single):
    """scan_layers' stacked checkpoint written by two processes, converted on restore by both to the per-layer
    layout of a run without it: the curve continues."""
    run_dir = str(tmp_path / "run")
    stopped = launch(4, 2, "8", "1", "1", "8", "--output-dir", run_dir, "--stop-at", "3", "--scan")
    resumed = launch(4, 2, "8", "1", "1", "8", "--output-dir", run_dir, "--resume")
    for result in stopped:
        assert result["losses"] == pytest.approx(single["losses"][:3], abs=1e-5, rel=1e-5)
        assert "['layers']['stacked']['mlp']['up_proj']['kernel']" in result["specs"]
    for result in resumed:
        assert result["losses"] == pytest.approx(single["losses"][3:], abs=1e-5, rel=1e-5)
        assert "['layers'][0]['mlp']['up_proj']['kernel']" in result["specs"]


def test_partial_multi_process_arguments_are_refused(monkeypatch):
    import jax

    from easytrain import ArgumentError, TrainingArguments
    from easytrain.distributed import initialize

    monkeypatch.setattr(jax.distributed, "is_initialized", lambda: False)
    with pytest.raises(ArgumentError, match="coordinator_address, num_processes and process_id together"):
        initialize(TrainingArguments(coordinator_address="10.0.0.1:1234"))


@pytest.mark.parametrize("env, expected", [({"SLURM_NTASKS": "4"}, "SLURM"), ({"SLURM_NTASKS": "1"}, None),
                                           ({"TPU_WORKER_HOSTNAMES": "a,b"}, "Cloud TPU (multi-host)"),
                                           ({"OMPI_COMM_WORLD_SIZE": "2"}, "Open MPI"), ({}, None)])
def test_cluster_auto_detection(monkeypatch, env, expected):
    from easytrain.distributed import auto_detected_cluster

    for variable in ("SLURM_NTASKS", "TPU_WORKER_HOSTNAMES", "OMPI_COMM_WORLD_SIZE"):
        monkeypatch.delenv(variable, raising=False)
    for variable, value in env.items():
        monkeypatch.setenv(variable, value)
    assert auto_detected_cluster() == expected


@pytest.mark.slow
def test_checkpoint_from_one_process_resumes_in_two(tmp_path, single):
    """Saved by one process on a (2,2,2) mesh; resumed by 2 processes x 4 devices on (8,1,1)."""
    run_dir = str(tmp_path / "run")
    launch(8, 1, "2", "2", "2", "8", "--output-dir", run_dir, "--stop-at", "3")
    resumed = launch(4, 2, "8", "1", "1", "8", "--output-dir", run_dir, "--resume")
    for result in resumed:
        assert result["losses"] == pytest.approx(single["losses"][3:], abs=1e-5, rel=1e-5)
