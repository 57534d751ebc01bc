"""SIGTERM to one process of a 2-process run: JAX's preemption service makes both save at the same step and
exit with status 75; both then resume from that checkpoint together."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from easytrain.checkpoint import finalized_steps
from easytrain.trainers.preemption import PREEMPTED_EXIT_CODE
from runs import xla_flags

FLAGS = ["--max_length", "16", "--train_batch_size", "8", "--eval_batch_size", "8", "--logging_steps", "1",
         "--eval_strategy", "no", "--save_steps", "100000", "--report_to", "jsonl", "--disable_progress_bar",
         "--save_pretrained_at_end", "false", "--max_train_samples", "64", "--lr_scheduler_type", "constant",
         "--warmup_ratio", "0"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(output_dir: Path, *extra: str) -> list[subprocess.Popen]:
    port = free_port()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "JAX_PLATFORMS": "cpu",
           "XLA_FLAGS": xla_flags(2)}
    return [subprocess.Popen([sys.executable, "-m", "easytrain", "train", "--output_dir", str(output_dir), *FLAGS,
                              "--coordinator_address", f"127.0.0.1:{port}", "--num_processes", "2",
                              "--process_id", str(index), *extra],
                             env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            for index in range(2)]


def logged_steps(output_dir: Path) -> list[int]:
    path = output_dir / "metrics.jsonl"
    lines = path.read_text().splitlines() if path.exists() else []
    return [json.loads(line)["step"] for line in lines if line.endswith("}")]


@pytest.mark.slow
def test_sigterm_to_one_process_stops_both_at_the_same_checkpoint(tmp_path):
    output_dir = tmp_path / "run"
    processes = launch(output_dir, "--max_steps", "100000")
    deadline = time.monotonic() + 300
    while len(logged_steps(output_dir)) < 3:
        if any(p.poll() is not None for p in processes) or time.monotonic() > deadline:
            for p in processes:
                p.kill()
            pytest.fail("\n".join(p.communicate()[0][-2000:] for p in processes))
        time.sleep(0.05)
    processes[1].send_signal(signal.SIGTERM)  # only the non-logging process is told
    outputs = [p.communicate(timeout=180)[0] for p in processes]
    assert [p.returncode for p in processes] == [PREEMPTED_EXIT_CODE] * 2, outputs[0][-2000:] + outputs[1][-2000:]
    (stopped_at,) = finalized_steps(output_dir / "checkpoints")
    for output in outputs:
        assert f"stopped by SIGTERM after step {stopped_at}" in output
    assert logged_steps(output_dir) == list(range(1, stopped_at + 1))

    resumed = launch(output_dir, "--max_steps", str(stopped_at + 2), "--resume_from_checkpoint", "latest")
    outputs = [p.communicate(timeout=300)[0] for p in resumed]
    assert [p.returncode for p in resumed] == [0, 0], outputs[0][-2000:] + outputs[1][-2000:]
    assert logged_steps(output_dir) == list(range(1, stopped_at + 3))
