"""`easytrain plot` on NaN/inf metrics: the curve's end is marked at the first non-finite step and the command says
which metrics stopped being finite and from which step; an all-non-finite metric is named, not silently dropped."""

import json
from pathlib import Path

import pytest

from easytrain.cli import main
from easytrain.plots import load_runs, make_figures, non_finite_steps, series_by_split

pytest.importorskip("matplotlib")


def nan_late_records(nan) -> list[dict]:
    """Loss finite at steps 5 and 10, then `nan` (a float or the sink's string) from step 15."""
    return [{"step": step, "split": "train", "loss": 2.0 / step if step < 15 else nan, "learning_rate": 1e-3}
            for step in (5, 10, 15, 20)] + [{"step": 20, "split": "eval", "eval_loss": float("inf")}]


def write_metrics(run_dir: Path, records: list[dict]) -> Path:
    run_dir.mkdir(parents=True)
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(record) + "\n" for record in records))
    return run_dir


@pytest.mark.parametrize("nan", [float("nan"), "nan", float("-inf"), "-inf", "inf"])
def test_first_non_finite_step_is_found_for_floats_and_the_sinks_strings(nan):
    records = nan_late_records(nan)
    assert non_finite_steps(records) == {"train": {"loss": 15}, "eval": {"eval_loss": 20}}
    assert series_by_split(records)["train"]["loss"] == ([5, 10], [0.4, 0.2])


def test_a_non_finite_value_replaced_on_resume_does_not_count():
    records = [{"step": 5, "split": "train", "loss": "nan"}, {"step": 5, "split": "train", "loss": 1.0}]
    assert non_finite_steps(records) == {}


def test_the_loss_figure_marks_where_the_curve_stops(tmp_path):
    run = write_metrics(tmp_path / "run", nan_late_records(float("nan")))
    figures = make_figures(load_runs([run]))
    texts = [text.get_text() for text in figures["loss"].axes[0].texts]
    assert any("non-finite from step 15" in text for text in texts), texts
    lines = [line for line in figures["loss"].axes[0].lines if list(line.get_xdata()) == [15, 15]]
    assert len(lines) == 1  # the vertical marker at step 15


def test_plot_prints_which_metrics_stopped_being_finite(tmp_path, capsys):
    run = write_metrics(tmp_path / "run", nan_late_records("nan"))
    assert main(["plot", str(run)]) == 0
    err = capsys.readouterr().err
    assert "loss: NaN/inf from step 15 (last finite value at step 10)" in err, err
    assert "eval_loss: no finite value (NaN/inf from step 20)" in err, err


def test_an_all_non_finite_loss_is_named_and_still_drawn(tmp_path, capsys):
    records = [{"step": step, "split": "train", "loss": "nan", "learning_rate": 1e-3} for step in (5, 10)]
    run = write_metrics(tmp_path / "run", records)
    assert main(["plot", str(run)]) == 0
    assert "loss: no finite value (NaN/inf from step 5)" in capsys.readouterr().err
    assert (run / "plots" / "loss.png").is_file()
