"""Two processes on localhost, each given its own --output_dir (storage the other does not see): both refuse at
set-up with the same error, instead of hanging at the first checkpoint save."""

import pytest

from runs import train_on_localhost
from test_multiprocess import free_port

FLAGS = ["--max_length", "16", "--train_batch_size", "8", "--logging_steps", "1", "--eval_strategy", "no",
         "--save_strategy", "steps", "--save_steps", "2", "--report_to", "jsonl", "--disable_progress_bar",
         "--save_pretrained_at_end", "false", "--max_steps", "6", "--validation_split_percentage", "0"]


@pytest.mark.slow
def test_two_processes_with_other_output_dirs_both_refuse_before_training(tmp_path, tokenizer_dir, text_lines):
    """Without the check both processes train, then wait forever at the first save for files the other wrote on
    its own path; with it both exit before training with the same error naming output_dir and process 1."""
    (train := tmp_path / "train.txt").write_text("\n".join(text_lines) + "\n")
    codes, outputs = train_on_localhost(
        [["--output_dir", str(tmp_path / f"run{index}"), "--train_file", str(train), "--tokenizer_name", tokenizer_dir,
          *FLAGS] for index in range(2)], free_port(), timeout=240)
    assert all(code not in (0, None) for code in codes), f"exit statuses {codes}: ran on unshared output_dirs"
    for output in outputs:
        assert "output_dir" in output and "process 1" in output and "shares" in output, output[-3000:]
    assert not (tmp_path / "run0" / "checkpoints").exists(), "a step was saved before the refusal"
    assert not (tmp_path / "run0").exists(), "the refused run left output_dir (or its token) behind"
