"""Two processes on localhost whose local train_file differs: both refuse at set-up, with the same error."""

import pytest

from runs import train_on_localhost
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
    codes, outputs = train_on_localhost(
        [["--output_dir", str(tmp_path / "run"), "--train_file", str(files[index]), "--tokenizer_name", tokenizer_dir,
          *FLAGS] for index in range(2)], free_port(), timeout=300)
    assert all(code not in (0, None) for code in codes), f"exit statuses {codes}: trained on mismatched rows"
    for output in outputs:
        assert "train_file" in output and "process 1" in output and "train rows" in output, output[-3000:]
