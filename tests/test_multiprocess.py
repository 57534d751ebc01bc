"""Two processes x 4 CPU devices on localhost behave like one process with 8 devices: the same losses, evaluation,
checkpoints, logged throughput (the global batch's tokens, not one process's share), and DPO reference log-probs
precomputed for every pair (each process computes its share and gathers the rest)."""

import json
import math
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from runs import child_env, xla_flags

ROOT = Path(__file__).resolve().parents[1]
WORKER = ROOT / "tests" / "workers" / "mesh_equivalence.py"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_each(devices_per_process: int, processes: int, runs: list[list[str]]) -> list[list[dict]]:
    """Each run's worker arguments trained in turn by the same `processes` processes (a process's start, its
    imports and `jax.distributed` join cost more than a run's five steps); results indexed [run][process]."""
    port = free_port()
    base = child_env(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", JAX_PLATFORMS="cpu",
                     XLA_FLAGS=xla_flags(devices_per_process))
    procs = []
    for index in range(processes):
        env = dict(base)
        if processes > 1:
            env["EASYTRAIN_TEST_PROCESSES"] = f"127.0.0.1:{port},{processes},{index}"
        procs.append(subprocess.Popen([sys.executable, str(WORKER), "--each", json.dumps(runs)], env=env, text=True,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE))
    per_process = []
    for proc in procs:
        out, err = proc.communicate(timeout=600)
        assert proc.returncode == 0, err[-3000:]
        per_process.append([json.loads(line) for line in out.splitlines() if line.startswith("{")])
        assert len(per_process[-1]) == len(runs), out[-3000:]
    return [list(results) for results in zip(*per_process)]


@pytest.fixture(scope="module")
def run_dirs(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("multiprocess")
    return {name: str(root / name) for name in ("match", "together", "stacked", "from_one", "dpo")}


@pytest.fixture(scope="module")
def single(run_dirs) -> dict:
    """One process with 8 devices on (8,1,1): 5 steps, then evaluate() with the exact-match evaluator. The same
    process then trains 3 steps on (2,2,2) and checkpoints them, for the two-process resume of that checkpoint, and
    takes one DPO step with precomputed reference log-probs (its result under "dpo")."""
    reference, _, dpo = launch_each(8, 1, [["8", "1", "1", "8", "--evaluate"],
                                           ["2", "2", "2", "8", "--output-dir", run_dirs["from_one"], "--stop-at", "3"],
                                           ["8", "1", "1", "8", "--dpo"]])
    return {**reference[0], "dpo": dpo[0]}


@pytest.fixture(scope="module")
def two_processes(run_dirs) -> dict[str, list[dict]]:
    """The first launches of the two-process tests, in one pair of processes: 5 steps with evaluate() and steps 2-3
    traced, two runs stopped and checkpointed at step 3 (one with stacked layers), and one DPO step with precomputed
    reference log-probs. Resumes start fresh processes."""
    runs = {"match": ["--evaluate", "--profile"], "together": ["--stop-at", "3"],
            "stacked": ["--stop-at", "3", "--scan"], "dpo": ["--dpo"]}
    results = launch_each(4, 2, [["8", "1", "1", "8", "--output-dir", run_dirs[name], *flags]
                                 for name, flags in runs.items()])
    return dict(zip(runs, results))


@pytest.fixture(scope="module")
def resumed(run_dirs, single, two_processes) -> dict[str, list[dict]]:
    """The three checkpoints written above, each resumed by 2 processes x 4 devices on (8,1,1), in one fresh pair
    of processes that wrote none of them (a resume from disk, as after a restart)."""
    names = ("together", "stacked", "from_one")
    results = launch_each(4, 2, [["8", "1", "1", "8", "--output-dir", run_dirs[name], "--resume"] for name in names])
    return dict(zip(names, results))


@pytest.mark.slow
def test_two_processes_match_one_process_with_eight_devices(run_dirs, single, two_processes):
    """Same losses and logged tokens; and evaluate(), generation included, gives both processes the single-process
    metrics."""
    first, second = two_processes["match"]
    assert (first["process"], second["process"]) == (0, 1)
    assert len({tuple(row) for row in single["sampled"]}) > 16, "samples too uniform to compare generation"
    for result in (first, second):
        assert result["losses"] == pytest.approx(single["losses"], abs=1e-5, rel=1e-5)
        assert result["logged_tokens"] == single["logged_tokens"] == [16 * 32] * 5, "tokens_per_second x step_time"
        assert result["sampled"] == result["sampled_under_mesh"] == single["sampled"]
        assert result["eval"]["eval_exact_match"] == single["eval"]["eval_exact_match"]
        assert result["eval"]["eval_loss"] == pytest.approx(single["eval"]["eval_loss"], rel=1e-5)
    for step, (a, b, whole) in enumerate(zip(first["example_ids"], second["example_ids"], single["example_ids"])):
        assert not set(a) & set(b), f"step {step}: both processes read the same example"
        assert a + b == whole, f"step {step}: together they read exactly the single-process batch"
    assert "metrics.jsonl" in first["written"] and "arguments.json" in first["written"]
    lines = (Path(run_dirs["match"]) / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == [1, 2, 3, 4, 5], "only process 0 logs, once per step"


@pytest.mark.slow
def test_two_processes_precompute_the_reference_log_probs_of_every_pair(single, two_processes):
    """Each process runs the reference over its share of the pairs and gathers the others': both hold every pair's
    log-probs, one process's values, and the first DPO step is ln 2 (a pair left at 0.0 would not be)."""
    alone = single["dpo"]
    assert len(alone["ref_logps"]) == 24 and not alone["cached"]
    assert alone["losses"][0] == pytest.approx(math.log(2), abs=1e-6)
    for result in two_processes["dpo"]:
        logps = np.asarray(result["ref_logps"])
        assert not result["cached"] and logps.shape == (24, 2)
        assert np.all(logps < 0), f"pairs left without: {np.flatnonzero(logps.max(1) >= 0).tolist()}"
        np.testing.assert_allclose(logps, alone["ref_logps"], rtol=1e-5, atol=1e-5)
        assert result["losses"][0] == pytest.approx(math.log(2), abs=1e-6)


@pytest.mark.slow
def test_each_process_writes_its_own_profile(run_dirs, two_processes):
    """Steps 2-3 traced (`profile_steps`) in each process, into a directory of its own, without changing the losses
    (the test above compares them with the untraced single process)."""
    for index in range(2):
        (trace,) = (Path(run_dirs["match"]) / "tensorboard" / f"process_{index}" / "plugins" / "profile").glob("*")
        assert list(trace.glob("*.xplane.pb")) and list(trace.glob("perfetto_trace.json.gz"))


@pytest.mark.slow
def test_two_processes_checkpoint_and_resume_together(run_dirs, single, two_processes, resumed):
    """Both processes write one checkpoint at step 3, then both restore it and continue the curve."""
    stopped = two_processes["together"]
    assert (Path(run_dirs["together"]) / "checkpoints" / "3").is_dir()
    for result in stopped:
        assert result["losses"] == pytest.approx(single["losses"][:3], abs=1e-5, rel=1e-5)
    for result in resumed["together"]:
        assert result["losses"] == pytest.approx(single["losses"][3:], abs=1e-5, rel=1e-5)


@pytest.mark.slow
def test_two_processes_resume_stacked_layers_into_separate_ones(run_dirs, single, two_processes, resumed):
    """scan_layers' stacked checkpoint written by two processes, converted on restore by both to the per-layer
    layout of a run without it: the curve continues."""
    stopped = two_processes["stacked"]
    for result in stopped:
        assert result["losses"] == pytest.approx(single["losses"][:3], abs=1e-5, rel=1e-5)
        assert "['layers']['stacked']['mlp']['up_proj']['kernel']" in result["specs"]
    for result in resumed["stacked"]:
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
def test_checkpoint_from_one_process_resumes_in_two(run_dirs, single, resumed):
    """Saved by one process on a (2,2,2) mesh (the `single` fixture's second run); resumed by 2 processes x 4
    devices on (8,1,1)."""
    assert (Path(run_dirs["from_one"]) / "checkpoints" / "3").is_dir()
    for result in resumed["from_one"]:
        assert result["losses"] == pytest.approx(single["losses"][3:], abs=1e-5, rel=1e-5)
