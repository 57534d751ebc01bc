"""Two processes on localhost whose local train_file differs: both refuse at set-up, with the same error."""

import subprocess
import sys

import pytest

from runs import child_env, xla_flags
from test_multiprocess import free_port

FLAGS = ["--max_length", "16", "--train_batch_size", "8", "--eval_batch_size", "8", "--logging_steps", "1",
         "--eval_strategy", "no", "--save_strategy", "no", "--report_to", "jsonl", "--disable_progress_bar",
         "--save_pretrained_at_end", "false", "--max_steps", "3", "--validation_split_percentage", "0"]


@pytest.mark.slow
def test_two_processes_with_other_train_files_both_refuse_before_training(tmp_path, tokenizer_dir, text_lines):
    """Process 1's local train_file holds other lines (the same count): without the check both processes train
    on mixed batches and exit 0; with it both exit with the same error naming the train split and process 1."""
    files = []
    for index in range(2):
        lines = text_lines if index == 0 else [line.upper() for line in text_lines]
        (tmp_path / f"host{index}").mkdir()
        (path := tmp_path / f"host{index}" / "train.txt").write_text("\n".join(lines) + "\n")
        files.append(path)
    port = free_port()
    env = child_env(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", JAX_PLATFORMS="cpu", XLA_FLAGS=xla_flags(2))
    processes = [subprocess.Popen([sys.executable, "-m", "easytrain", "train", "--output_dir", str(tmp_path / "run"),
                                   "--train_file", str(files[index]), "--tokenizer_name", tokenizer_dir, *FLAGS,
                                   "--coordinator_address", f"127.0.0.1:{port}", "--num_processes", "2",
                                   "--process_id", str(index)],
                                  env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
                 for index in range(2)]
    outputs = []
    try:
        for process in processes:
            outputs.append(process.communicate(timeout=300)[0])
    except subprocess.TimeoutExpired:
        for process in processes:
            process.kill()
        pytest.fail("the processes hung: " + "\n".join(p.communicate()[0][-2000:] for p in processes))
    codes = [process.returncode for process in processes]
    assert all(code not in (0, None) for code in codes), f"exit statuses {codes}: trained on mismatched rows"
    for output in outputs:
        assert "train_file" in output and "process 1" in output and "train rows" in output, output[-3000:]
