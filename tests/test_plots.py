"""`easytrain plot`: PNG figures from runs' metrics.jsonl, one line per run."""

import json
import math
import sys
from pathlib import Path

import pytest

from easytrain.cli import main
from easytrain.plots import load_runs, make_figures, run_labels, series_by_split

pytest.importorskip("matplotlib")  # the `plot` extra (also in `test`)

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
FIGURES = ("loss", "learning_rate", "eval", "throughput")


def write_run(run_dir: Path, peak_lr: float, steps: int = 200, torn_tail: bool = False) -> Path:
    """A metrics.jsonl shaped like the trainer's: train logs every 10 steps, evals every 50."""
    run_dir.mkdir(parents=True)
    lines = []
    for step in range(10, steps + 1, 10):
        lr = peak_lr * min(1.0, step / 20) * 0.5 * (1 + math.cos(math.pi * step / steps))
        lines.append({"step": step, "split": "train", "loss": 3.0 * math.exp(-step * peak_lr * 8) + 0.02,
                      "learning_rate": lr, "tokens_per_second": 5000 + 3000 * math.sin(step * peak_lr) ** 2,
                      "grad_norm": 1.0, "time": 1.0})
        if step % 50 == 0:
            eval_loss = 2.5 * math.exp(-step * peak_lr * 6) + 0.05
            lines.append({"step": step, "split": "eval", "eval_loss": eval_loss, "eval_perplexity": math.exp(eval_loss),
                          "eval_exact_match": 1 - math.exp(-step * peak_lr * 5), "time": 1.0})
    text = "".join(json.dumps(line) + "\n" for line in lines)
    (run_dir / "metrics.jsonl").write_text(text + ('{"step": 999, "split": "tr' if torn_tail else ""))
    return run_dir


def check_png(path: Path) -> None:
    from matplotlib.image import imread

    assert path.read_bytes()[:8] == PNG_SIGNATURE, path
    height, width, channels = imread(path).shape
    assert height > 200 and width > 300 and channels in (3, 4)


def test_two_runs_on_every_figure(tmp_path):
    runs = [write_run(tmp_path / "baseline", 3e-3), write_run(tmp_path / "high_lr", 1e-2, torn_tail=True)]
    assert main(["plot", *map(str, runs), "--out", str(tmp_path / "figures")]) == 0
    for name in FIGURES:
        check_png(tmp_path / "figures" / f"{name}.png")
    loss = make_figures(load_runs(runs))["loss"]
    lines = loss.axes[0].get_lines()
    assert [line.get_label() for line in lines] == ["baseline", "high_lr"]  # one line per run, named by run
    assert len(lines[0].get_xdata()) == 20


def test_eval_figure_has_a_panel_per_eval_metric(tmp_path):
    figure = make_figures(load_runs([write_run(tmp_path / "run", 3e-3)]))["eval"]
    titles = [ax.get_title() for ax in figure.axes if ax.get_visible()]
    assert titles == ["loss", "exact match", "perplexity"]


def test_one_run_writes_into_its_own_plots_directory(tmp_path, capsys):
    run = write_run(tmp_path / "run", 3e-3)
    assert main(["plot", str(run)]) == 0
    assert sorted(p.name for p in (run / "plots").iterdir()) == sorted(f"{name}.png" for name in FIGURES)
    assert str(run / "plots" / "loss.png") in capsys.readouterr().out


def test_several_runs_default_to_plots_in_the_working_directory(tmp_path, monkeypatch):
    runs = [write_run(tmp_path / "a", 3e-3), write_run(tmp_path / "b", 1e-2)]
    monkeypatch.chdir(tmp_path)
    assert main(["plot", *map(str, runs)]) == 0
    check_png(tmp_path / "plots" / "loss.png")


def test_equal_directory_names_are_disambiguated(tmp_path):
    assert run_labels([tmp_path / "x" / "run", tmp_path / "y" / "run"]) == ["x/run", "y/run"]
    assert run_labels([tmp_path / "run", tmp_path / "run"]) == ["run (1)", "run (2)"]


def test_a_figure_without_data_is_skipped(tmp_path):
    run = tmp_path / "no_eval"
    run.mkdir()
    (run / "metrics.jsonl").write_text(json.dumps({"step": 1, "split": "train", "loss": 2.0}) + "\n")
    assert main(["plot", str(run)]) == 0
    assert [p.name for p in (run / "plots").iterdir()] == ["loss.png"]


def test_a_resumed_run_keeps_the_last_value_of_a_step():
    records = [{"step": 1, "split": "train", "loss": 3.0}, {"step": 2, "split": "train", "loss": 9.0},
               {"step": 2, "split": "train", "loss": 2.0}]
    assert series_by_split(records)["train"]["loss"] == ([1, 2], [3.0, 2.0])


def test_missing_metrics_file_is_named(tmp_path, capsys):
    assert main(["plot", str(tmp_path / "nothing")]) == 2
    err = capsys.readouterr().err
    assert "metrics.jsonl" in err and "--report_to jsonl" in err


def test_missing_matplotlib_names_the_extra(tmp_path, monkeypatch, capsys):
    run = write_run(tmp_path / "run", 3e-3)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # makes `import matplotlib` raise ImportError
    assert main(["plot", str(run)]) == 2
    assert "pip install 'easytrain[plot]'" in capsys.readouterr().err


def test_several_run_dirs_default_to_the_working_directory_when_only_one_has_metrics(tmp_path, monkeypatch, capsys):
    run, refused = write_run(tmp_path / "a", 3e-3), tmp_path / "refused"
    refused.mkdir()
    (refused / "job.json").write_text("{}")
    monkeypatch.chdir(tmp_path)
    assert main(["plot", str(run), str(refused)]) == 0
    check_png(tmp_path / "plots" / "loss.png")
    assert not (run / "plots").exists()
    assert f"skipping {refused}" in capsys.readouterr().err
