"""Two processes on localhost, each given its own --output_dir (storage the other does not see): both refuse at
set-up with the same error, instead of hanging at the first checkpoint save."""

import subprocess
import sys

import pytest

from runs import child_env, xla_flags
from test_multiprocess import free_port

FLAGS = ["--max_length", "16", "--train_batch_size", "8", "--logging_steps", "1", "--eval_strategy", "no",
         "--save_strategy", "steps", "--save_steps", "2", "--report_to", "jsonl", "--disable_progress_bar",
         "--save_pretrained_at_end", "false", "--max_steps", "6", "--validation_split_percentage", "0"]


@pytest.mark.slow
def test_two_processes_with_other_output_dirs_both_refuse_before_training(tmp_path, tokenizer_dir, text_lines):
    """Without the check both processes train, then wait forever at the first save for files the other wrote on
    its own path; with it both exit before training with the same error naming output_dir and process 1."""
    (train := tmp_path / "train.txt").write_text("\n".join(text_lines) + "\n")
    port = free_port()
    env = child_env(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", JAX_PLATFORMS="cpu", XLA_FLAGS=xla_flags(2))
    processes = [subprocess.Popen([sys.executable, "-m", "easytrain", "train",
                                   "--output_dir", str(tmp_path / f"run{index}"), "--train_file", str(train),
                                   "--tokenizer_name", tokenizer_dir, *FLAGS,
                                   "--coordinator_address", f"127.0.0.1:{port}", "--num_processes", "2",
                                   "--process_id", str(index)],
                                  env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
                 for index in range(2)]
    outputs = []
    try:
        for process in processes:
            outputs.append(process.communicate(timeout=240)[0])
    except subprocess.TimeoutExpired:
        for process in processes:
            process.kill()
        pytest.fail("the processes hung: " + "\n".join(p.communicate()[0][-2000:] for p in processes))
    codes = [process.returncode for process in processes]
    assert all(code not in (0, None) for code in codes), f"exit statuses {codes}: ran on unshared output_dirs"
    for output in outputs:
        assert "output_dir" in output and "process 1" in output and "shares" in output, output[-3000:]
    assert not (tmp_path / "run0" / "checkpoints").exists(), "a step was saved before the refusal"
    assert [p.name for p in (tmp_path / "run0").iterdir() if p.name.startswith(".easytrain-shared")] == []
