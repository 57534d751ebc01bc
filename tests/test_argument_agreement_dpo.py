"""The processes agree on their arguments before any collective of the data preparation: DPO's precomputed
reference log-probs compile and gather while the data is prepared, so processes given other DPO options would
otherwise fail there in a raw Gloo timeout naming no option. DPO's own arguments are its trainer's when it is built,
so they are compared in the start's first gather: the command is refused before job.json, leaving no output_dir."""

import pytest

from easytrain.cli import REFUSED_EXIT_CODE

FLAGS = ["--task", "dpo", "--max_length", "32", "--train_batch_size", "8", "--eval_batch_size", "8",
         "--eval_strategy", "no", "--save_strategy", "no", "--report_to", "jsonl", "--disable_progress_bar",
         "--save_pretrained_at_end", "false", "--max_steps", "2", "--max_train_samples", "16",
         "--max_eval_samples", "8"]


@pytest.mark.slow
def test_processes_given_other_dpo_options_refuse_before_preparing_the_data(tmp_path):
    from runs import train_on_localhost
    from test_multiprocess import free_port

    common = ["--output_dir", str(tmp_path / "run"), *FLAGS]
    codes, outputs = train_on_localhost([common, [*common, "--precompute_ref_log_probs", "true"]], free_port(),
                                        timeout=300)
    assert codes == [REFUSED_EXIT_CODE] * 2, f"exit statuses {codes}: {outputs[-1][-3000:]}"
    for output in outputs:
        assert "precompute_ref_log_probs (process 0: false; process 1: true)" in output, output[-3000:]
    assert not (tmp_path / "run").exists(), "a start refused when the trainers are built left its output_dir"
