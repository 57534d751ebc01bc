"""`easytrain plot RUN_DIR [RUN_DIR ...] [--out DIR]`: PNG figures of runs' `metrics.jsonl` logs.

Writes `loss.png` (training loss), `learning_rate.png`, `eval.png` (one panel per `eval_*` metric)
and `throughput.png` (tokens per second), each with one line per run, so runs compare at a glance
without TensorBoard. A figure whose metric no run logged is skipped. Where a metric turns NaN or infinite, its
curve ends at a dotted vertical line labelled with that step, and the command prints which metrics did so.

matplotlib is an optional dependency (`pip install 'easytrain[plot]'`). Figures are drawn with its
object-oriented API on the Agg canvas: headless, and it leaves the caller's pyplot backend alone.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from easytrain.errors import ArgumentError, EasytrainError
from easytrain.reporting import METRICS_FILENAME

PLOTS_DIRNAME = "plots"
NOT_METRICS = ("eval_num_tokens",)  # how many tokens were evaluated: bookkeeping, not a curve worth a panel
INSTALL_HINT = "pip install 'easytrain[plot]'"
Series = tuple[list[int], list[float]]
#: How the jsonl sink writes non-finite numbers (JSON has none); older files hold NaN / Infinity literals.
NON_FINITE_STRINGS = {"nan": math.nan, "inf": math.inf, "-inf": -math.inf}


@dataclass
class Run:
    """One run's metrics: `train[name]` and `eval[name]` are (steps, finite values), sorted by step;
    `train_non_finite[name]` and `eval_non_finite[name]` the first step whose value is NaN or infinite."""

    label: str
    path: Path
    train: dict[str, Series] = field(default_factory=dict)
    eval: dict[str, Series] = field(default_factory=dict)
    train_non_finite: dict[str, int] = field(default_factory=dict)
    eval_non_finite: dict[str, int] = field(default_factory=dict)


# ----------------------------------------------------------------------------- reading


def metrics_path(run_dir: str | Path) -> Path:
    """`RUN_DIR/metrics.jsonl`, or the file itself when a `.jsonl` file is given."""
    path = Path(run_dir)
    path = path if path.is_file() else path / METRICS_FILENAME
    if not path.is_file():
        raise ArgumentError("run_dir", f"{str(path)!r} does not exist; pass the output_dir of a run trained "
                                       f"with --report_to jsonl (the default).")
    return path


def split_by_metrics(run_dirs: Sequence[str | Path]) -> tuple[list[Path], list[str]]:
    """(metrics files, run directories without one): a glob such as `runs/*/` also matches runs that wrote no
    metrics (refused before training, or without the jsonl sink); those are skipped, unless none has metrics."""
    found, missing = [], []
    for run_dir in run_dirs:
        try:
            found.append(metrics_path(run_dir))
        except ArgumentError as error:
            if len(run_dirs) == 1:
                raise
            missing.append((str(run_dir), error))
    if not found:
        raise ArgumentError("run_dir", f"none of {', '.join(repr(name) for name, _ in missing)} holds a "
                                       f"{METRICS_FILENAME}; pass the output_dir of a run trained with --report_to "
                                       f"jsonl (the default).")
    return found, [name for name, _ in missing]


def read_records(path: Path) -> list[dict[str, Any]]:
    """The JSON objects of a metrics file; a torn last line (a killed run) is skipped."""
    records = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict) and "step" in record:
            records.append(record)
    return records


def _number(value: Any) -> float | None:
    """A metric's value as a float (NaN and infinities included), None for what is not a number."""
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return float(value)
    return NON_FINITE_STRINGS.get(value.lower()) if isinstance(value, str) else None


def _points(records: Sequence[dict[str, Any]]) -> dict[str, dict[str, dict[int, float]]]:
    """`{split: {metric: {step: value}}}`, NaN and infinities kept; the last value logged at a step wins."""
    points: dict[str, dict[str, dict[int, float]]] = {}
    for record in records:
        split, step = str(record.get("split", "train")), int(record["step"])
        for name, value in record.items():
            number = None if name in ("step", "split", "time") else _number(value)
            if number is not None:
                points.setdefault(split, {}).setdefault(name, {})[step] = number
    return points


def series_by_split(records: Sequence[dict[str, Any]]) -> dict[str, dict[str, Series]]:
    """`{split: {metric: (steps, finite values)}}`; the last value logged at a step wins (a resumed run). A metric
    with no finite value is absent (`non_finite_steps` names it)."""
    series: dict[str, dict[str, Series]] = {}
    for split, metrics in _points(records).items():
        for name, values in metrics.items():
            steps = [step for step in sorted(values) if math.isfinite(values[step])]
            if steps:
                series.setdefault(split, {})[name] = (steps, [values[step] for step in steps])
    return series


def non_finite_steps(records: Sequence[dict[str, Any]]) -> dict[str, dict[str, int]]:
    """`{split: {metric: first step whose (last logged) value is NaN or infinite}}`, for the metrics that have one:
    where a curve stops meaning anything, which a plot of the finite values alone would hide."""
    found: dict[str, dict[str, int]] = {}
    for split, metrics in _points(records).items():
        for name, values in metrics.items():
            steps = [step for step, value in values.items() if not math.isfinite(value)]
            if steps:
                found.setdefault(split, {})[name] = min(steps)
    return found


def non_finite_messages(runs: Sequence[Run]) -> list[str]:
    """One line per run and metric that turned NaN or infinite: from which step, and where its curve ends."""
    lines = []
    for run in runs:
        for series, first in ((run.train, run.train_non_finite), (run.eval, run.eval_non_finite)):
            for name, step in sorted(first.items()):
                before = [s for s in series[name][0] if s < step] if name in series else []
                if name not in series:
                    what = f"no finite value (NaN/inf from step {step})"
                elif before:
                    what = f"NaN/inf from step {step} (last finite value at step {before[-1]})"
                else:
                    what = f"NaN/inf from step {step}"
                lines.append(f"{run.label}: {name}: {what}")
    return lines


def run_labels(paths: Sequence[Path]) -> list[str]:
    """Directory names, with parent directories added until they differ (`a/run`, `b/run`)."""
    parts = [Path(path).resolve().parts[1:] or ("/",) for path in paths]  # parts[0] is the root
    for depth in range(1, max(len(p) for p in parts) + 1 if parts else 1):
        labels = ["/".join(p[-depth:]) for p in parts]
        if len(set(labels)) == len(labels):
            return labels
    return [f"{p[-1]} ({i + 1})" for i, p in enumerate(parts)]  # the same directory given twice


def load_runs(run_dirs: Sequence[str | Path]) -> list[Run]:
    """Every run's metrics; each of `run_dirs` must hold a metrics file (`split_by_metrics` sorts them out)."""
    files = [metrics_path(run_dir) for run_dir in run_dirs]
    labels = run_labels([path.parent for path in files])
    runs = []
    for label, path in zip(labels, files):
        records = read_records(path)
        splits, first = series_by_split(records), non_finite_steps(records)
        runs.append(Run(label, path.parent, splits.get("train", {}), splits.get("eval", {}),
                        first.get("train", {}), first.get("eval", {})))
    return runs


# ----------------------------------------------------------------------------- drawing


def _matplotlib() -> Any:
    try:
        import matplotlib
        from matplotlib import ticker
        from matplotlib.figure import Figure
    except ImportError as error:
        raise EasytrainError(f"`easytrain plot` needs matplotlib ({error}); install it with: {INSTALL_HINT}")
    return matplotlib, ticker, Figure


def _wants_log_scale(values: Sequence[float]) -> bool:
    """Log y when every value is positive and they span more than a decade and a half (losses, perplexity)."""
    return bool(values) and min(values) > 0 and max(values) / min(values) > 30


def _style_axes(ax: Any, title: str, ylabel: str, values: Sequence[float], ticker: Any, log_ok: bool) -> None:
    ax.set_title(title, fontsize="medium")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel(ylabel)
    ax.grid(True, which="major", alpha=0.3)
    ax.xaxis.set_major_formatter(ticker.EngFormatter(sep=""))
    if log_ok and _wants_log_scale(values):
        ax.set_yscale("log")
        ax.grid(True, which="minor", alpha=0.1)


def _figure(runs: Sequence[Run], Figure: Any, nrows: int = 1, ncols: int = 1) -> tuple[Any, Any]:
    width = 4.6 * ncols + (1.4 if len(runs) > 1 else 0.4)  # room for the legend on the right
    figure = Figure(figsize=(width, 3.4 * nrows + 0.6), layout="constrained")
    return figure, figure.subplots(nrows, ncols, squeeze=False)


def _title(title: str, runs: Sequence[Run]) -> str:
    """A single run is named in the title instead of a legend."""
    return f"{title} — {runs[0].label}" if len(runs) == 1 else title


def _legend(figure: Any, axes: Any, runs: Sequence[Run]) -> None:
    """One legend per figure, outside the panels so it never hides a curve; none for a single run
    (its name is the figure's title)."""
    if len(runs) < 2:
        return
    handles, labels = {}, []
    for ax in axes.flat:
        for handle, label in zip(*ax.get_legend_handles_labels()):
            if label not in handles:
                handles[label] = handle
                labels.append(label)
    figure.legend([handles[label] for label in labels], labels, loc="outside right upper", fontsize="small",
                  frameon=False)


def _mark_non_finite(ax: Any, step: int, color: Any) -> None:
    """A dotted vertical line at the first NaN/inf step, labelled, so a curve that ends there is not read as a run
    that stopped."""
    ax.axvline(step, color=color, linestyle=":", linewidth=1.2)
    ax.annotate(f"non-finite from step {step}", xy=(step, 0.98), xycoords=("data", "axes fraction"), rotation=90,
                ha="right", va="top", fontsize="x-small", color=color)


def _line_plot(runs: Sequence[Run], metric: str, title: str, ylabel: str, ticker: Any, Figure: Any,
               colors: Sequence[Any], log_ok: bool = False) -> Any | None:
    """One line per run of train metric `metric`, or None when no run logged it. `log_ok` lets a wide
    range switch to a log axis (losses; a schedule or a throughput reads better linear)."""
    present = [(run, color) for run, color in zip(runs, colors)
               if metric in run.train or metric in run.train_non_finite]
    if not present:
        return None
    figure, axes = _figure(runs, Figure)
    ax = axes[0, 0]
    values: list[float] = []
    for run, color in present:
        steps, ys = run.train.get(metric, ([], []))
        ax.plot(steps, ys, color=color, label=run.label, linewidth=1.4, marker="." if len(steps) < 30 else None)
        values += ys
        if metric in run.train_non_finite:
            _mark_non_finite(ax, run.train_non_finite[metric], color)
    _style_axes(ax, _title(title, runs), ylabel, values, ticker, log_ok)
    _legend(figure, axes, runs)
    return figure


def _eval_plot(runs: Sequence[Run], ticker: Any, Figure: Any, colors: Sequence[Any]) -> Any | None:
    """One panel per `eval_*` metric (any run), one line with markers per run."""
    names = sorted({name for run in runs for name in (*run.eval, *run.eval_non_finite) if name.startswith("eval_")}
                   - set(NOT_METRICS),
                   key=lambda name: (name != "eval_loss", name))
    if not names:
        return None
    ncols = 2 if len(names) == 4 else min(3, len(names))  # 2x2 rather than a row of 3 and a lone panel
    nrows = math.ceil(len(names) / ncols)
    figure, axes = _figure(runs, Figure, nrows, ncols)
    for ax, name in zip(axes.flat, names):
        values: list[float] = []
        for run, color in zip(runs, colors):
            if name in run.eval:
                steps, ys = run.eval[name]
                ax.plot(steps, ys, color=color, label=run.label, linewidth=1.4, marker="o", markersize=3.5)
                values += ys
            if name in run.eval_non_finite:
                _mark_non_finite(ax, run.eval_non_finite[name], color)
        log_ok = "loss" in name or "perplexity" in name
        _style_axes(ax, name.removeprefix("eval_").replace("_", " "), name, values, ticker, log_ok)
    for ax in list(axes.flat)[len(names):]:
        ax.set_visible(False)
    figure.suptitle(_title("Evaluation", runs), fontsize="large")
    _legend(figure, axes, runs)
    return figure


def make_figures(runs: Sequence[Run]) -> dict[str, Any]:
    """`{name: matplotlib Figure}` for every figure some run has data for."""
    matplotlib, ticker, Figure = _matplotlib()
    cycle = matplotlib.rcParams["axes.prop_cycle"].by_key().get("color", ["C0"])
    colors = [cycle[i % len(cycle)] for i in range(len(runs))]
    figures = {
        "loss": _line_plot(runs, "loss", "Training loss", "loss", ticker, Figure, colors, log_ok=True),
        "learning_rate": _line_plot(runs, "learning_rate", "Learning rate", "learning rate", ticker, Figure, colors),
        "eval": _eval_plot(runs, ticker, Figure, colors),
        "throughput": _line_plot(runs, "tokens_per_second", "Throughput", "tokens / second", ticker, Figure, colors),
    }
    if figures["throughput"] is not None:  # from zero: a dip (an eval inside the window) reads at its true size
        axis = figures["throughput"].axes[0]
        axis.yaxis.set_major_formatter(ticker.EngFormatter(sep=""))
        axis.set_ylim(bottom=0)
    return {name: figure for name, figure in figures.items() if figure is not None}


def write_figures(runs: Sequence[Run], out: str | Path, dpi: int = 130) -> list[Path]:
    """Save every figure as `out/NAME.png`; returns the paths written."""
    figures = make_figures(runs)
    if not figures:
        raise ArgumentError("run_dir", f"no loss, learning_rate, eval_* or tokens_per_second values in "
                                       f"{', '.join(str(run.path) for run in runs)}; nothing to plot.")
    out = Path(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as error:  # a file of that name (or in its path), no permission
        raise ArgumentError("out", f"cannot create the directory {out} ({error.strerror or error}); pass --out "
                                   "a directory (created if missing), not a file.") from error
    written = []
    for name, figure in figures.items():
        path = out / f"{name}.png"
        figure.savefig(path, dpi=dpi)
        written.append(path)
    return written


def main(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(prog="easytrain plot", allow_abbrev=False,
                                     description="PNG figures (loss, learning rate, eval metrics, throughput) "
                                                 "of one or more runs' metrics.jsonl, one line per run.")
    parser.add_argument("run_dirs", nargs="+", metavar="RUN_DIR",
                        help="A run's output_dir (holding metrics.jsonl), or a metrics .jsonl file.")
    parser.add_argument("--out", default=None,
                        help=f"Output directory; default RUN_DIR/{PLOTS_DIRNAME} for one RUN_DIR, ./{PLOTS_DIRNAME} "
                             f"for several (even if only one has metrics).")
    options = parser.parse_args(list(argv))
    files, skipped = split_by_metrics(options.run_dirs)
    for run_dir in skipped:
        print(f"easytrain plot: skipping {run_dir}: no {METRICS_FILENAME} (a run that never trained, or trained "
              "without --report_to jsonl)", file=sys.stderr)
    runs = load_runs(files)
    for line in non_finite_messages(runs):
        print(f"easytrain plot: {line}", file=sys.stderr)
    # decided by the RUN_DIRs given, not those with metrics: `plot a b` writes to ./plots even if b never trained
    out = options.out or (runs[0].path / PLOTS_DIRNAME if len(options.run_dirs) == 1 else Path(PLOTS_DIRNAME))
    for path in write_figures(runs, out):
        print(path)
    return 0
