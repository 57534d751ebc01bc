"""The end of `easytrain train`: the JSON line on stdout stays as scripts parse it, and stderr says where the run
went, how long it took and its final eval metrics, rounded, for a person reading the terminal or a log."""

import json
import re
import textwrap

from easytrain.cli import main

from test_cli import HAND_WRITTEN

TINY = ["--max_length", "16", "--train_batch_size", "4", "--eval_batch_size", "4", "--max_steps", "2",
        "--max_train_samples", "16", "--max_eval_samples", "8", "--report_to", "jsonl", "--disable_progress_bar"]


def test_summary_on_stderr_names_results_and_rounds_metrics(tmp_path, monkeypatch, capsys):
    (tmp_path / "hand_written_trainer.py").write_text(textwrap.dedent(HAND_WRITTEN))
    monkeypatch.syspath_prepend(str(tmp_path))
    out_dir = tmp_path / "out"
    assert main(["train", "--task", "hand_written_trainer:LinearRegressionTrainer", "--max_steps", "3",
                 "--output_dir", str(out_dir)]) == 0
    captured = capsys.readouterr()
    summary = json.loads(captured.out.strip().splitlines()[-1])  # unchanged: the full-precision JSON line
    assert summary == json.loads((out_dir / "results.json").read_text())
    err = captured.err
    assert re.search(r"easytrain: done in \d+(\.\d)? s", err), err
    assert f"results: {out_dir / 'results.json'}" in err
    assert f"eval_loss {summary['eval_loss']:.4g}" in err
    assert "final_model" not in err  # this trainer exports nothing


def test_summary_names_the_exported_model(tmp_path, capsys):
    out_dir = tmp_path / "run"
    assert main(["train", "--output_dir", str(out_dir), *TINY]) == 0
    captured = capsys.readouterr()
    summary = json.loads(captured.out.strip().splitlines()[-1])
    assert f"model: {out_dir / 'final_model'}" in captured.err
    assert f"eval_exact_match {summary['eval_exact_match']:.4g}" in captured.err
    assert (out_dir / "final_model").is_dir()
