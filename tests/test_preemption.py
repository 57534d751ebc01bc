"""A real SIGTERM / SIGINT to a training process: it finishes the step, checkpoints, flushes its logs and exits
with status 75; the next start resumes from that checkpoint. In process: the checkpoint the stop names is complete
when the stop is raised."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import easytrain.trainers.loop_ending as loop_ending
from easytrain.checkpoint import finalized_steps
from easytrain.jobs import read_job
from easytrain.trainers.preemption import PREEMPTED_EXIT_CODE, TrainingPreempted
from signal_callbacks import SigtermAt
from test_foundation import regression_trainer, tiny_args

FLAGS = ["--max_length", "16", "--train_batch_size", "4", "--eval_batch_size", "4", "--logging_steps", "1",
         "--eval_strategy", "no", "--save_steps", "100000", "--report_to", "jsonl", "tensorboard",
         "--disable_progress_bar", "--save_pretrained_at_end", "false", "--max_train_samples", "64",
         # a schedule that does not depend on max_steps, so runs of different lengths share a curve
         "--lr_scheduler_type", "constant", "--warmup_ratio", "0"]


def train(output_dir: Path, *extra: str) -> subprocess.Popen:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "JAX_PLATFORMS": "cpu"}
    return subprocess.Popen([sys.executable, "-m", "easytrain", "train", "--output_dir", str(output_dir), *FLAGS,
                             *extra], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def train_steps(output_dir: Path) -> dict[int, float]:
    path = output_dir / "metrics.jsonl"
    if not path.exists():
        return {}
    records = [json.loads(line) for line in path.read_text().splitlines() if line.endswith("}")]
    return {r["step"]: r["loss"] for r in records if r["split"] == "train"}


def wait_for_steps(process: subprocess.Popen, output_dir: Path, count: int, timeout: float = 240.0) -> None:
    deadline = time.monotonic() + timeout
    while len(train_steps(output_dir)) < count:
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            pytest.fail(f"training did not reach {count} logged steps:\n{process.communicate()[0][-3000:]}")
        time.sleep(0.05)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_checkpoints_flushes_and_exits_75_then_resumes(tmp_path, sig):
    output_dir = tmp_path / "run"
    process = train(output_dir, "--max_steps", "100000")
    wait_for_steps(process, output_dir, 3)
    process.send_signal(sig)
    output, _ = process.communicate(timeout=120)
    assert process.returncode == PREEMPTED_EXIT_CODE, output[-3000:]
    logged = train_steps(output_dir)
    stopped_at = max(logged)
    assert f"stopped by {sig.name} after step {stopped_at}" in output
    assert sorted(logged) == list(range(1, stopped_at + 1)), "every finished step is in the flushed log"
    assert finalized_steps(output_dir / "checkpoints") == [stopped_at], "complete checkpoint at the stopped step"
    job = read_job(output_dir)
    assert (job["status"], job["step"], job["error"]) == ("stopped", stopped_at, None)
    assert f"stopped by {sig.name} after step {stopped_at}" in job["stop_reason"]
    if sig is not signal.SIGTERM:
        return  # resuming is the same for both signals; checked once below to keep the suite short

    resumed = train(output_dir, "--max_steps", str(stopped_at + 3), "--resume_from_checkpoint", "latest")
    output, _ = resumed.communicate(timeout=240)
    assert resumed.returncode == 0, output[-3000:]
    assert f"resumed from {output_dir / 'checkpoints' / str(stopped_at)}" in output
    job = read_job(output_dir)
    assert (job["status"], job["resumed_from_step"], job["progress"]) == ("completed", stopped_at, 100.0)
    assert sorted(train_steps(output_dir)) == list(range(1, stopped_at + 4))
    reference_dir = tmp_path / "reference"  # the continued curve equals a run that was never stopped
    reference = train(reference_dir, "--max_steps", str(stopped_at + 3))
    assert reference.wait(timeout=240) == 0
    assert train_steps(output_dir) == train_steps(reference_dir)


def test_the_checkpoint_a_sigterm_stop_names_is_complete_when_the_stop_is_raised(tmp_path, monkeypatch):
    """The process may be killed right after it reports the stop: the checkpoint that `TrainingPreempted` (and its
    'checkpoint <path>' log line) names is already finalized then, not still being written in the background."""
    complete = {}

    class Recording(TrainingPreempted):
        def __init__(self, step, signal_name, checkpoint, during=None):
            complete[checkpoint] = int(Path(checkpoint).name) in finalized_steps(Path(checkpoint).parent)
            super().__init__(step, signal_name, checkpoint, during)

    monkeypatch.setattr(loop_ending, "TrainingPreempted", Recording)
    args = tiny_args(tmp_path, max_steps=3, save_strategy="steps", save_steps=100)
    with pytest.raises(TrainingPreempted):
        regression_trainer(args, callbacks=[SigtermAt(1)]).train()
    assert complete == {str(tmp_path / "run" / "checkpoints" / "1"): True}
