"""Reporter sinks: JSONL content, TensorBoard events, resume purging, console output."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from tensorboardX.proto import event_pb2

from easytrain.reporting import (
    Reporter,
    format_metrics,
    parse_report_to,
    progress_description,
    tensorboard_tag,
    truncate_jsonl,
)

from event_files import read_event_file


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def read_events(logdir: Path) -> list[event_pb2.Event]:
    files = sorted(logdir.glob("events.out.tfevents.*"), key=lambda p: (p.stat().st_mtime_ns, p.name))
    return [event for path in files for event in read_event_file(path)]


def scalars(events: list[event_pb2.Event]) -> list[tuple[str, int, float]]:
    return [(value.tag, event.step, value.simple_value) for event in events for value in event.summary.value]


def make_reporter(output_dir: Path, **kwargs) -> Reporter:
    kwargs = {"total_steps": 10, "show_progress": False, **kwargs}
    return Reporter(output_dir=output_dir, **kwargs)


# ----------------------------------------------------------------------------- sinks


def test_jsonl_has_one_object_per_call(tmp_path: Path) -> None:
    with make_reporter(tmp_path) as reporter:
        reporter.log(1, {"loss": 2.5, "learning_rate": np.float32(1e-3)})
        reporter.log(2, {"eval_loss": 2.25}, split="eval")
    records = read_jsonl(tmp_path / "metrics.jsonl")
    assert [(r["step"], r["split"]) for r in records] == [(1, "train"), (2, "eval")]
    assert records[0]["loss"] == 2.5
    assert records[0]["learning_rate"] == pytest.approx(1e-3)
    assert records[1]["eval_loss"] == 2.25
    assert all(isinstance(r["time"], float) for r in records)
    assert list(records[0]) == ["step", "split", "loss", "learning_rate", "time"]


def test_tensorboard_scalars_use_split_tags_and_global_step(tmp_path: Path) -> None:
    with make_reporter(tmp_path) as reporter:
        reporter.log(3, {"loss": 1.5})
        reporter.log(4, {"eval_loss": 1.25, "perplexity": 3.5}, split="eval")
    values = scalars(read_events(tmp_path / "tensorboard"))
    assert values == [("train/loss", 3, 1.5), ("eval/loss", 4, 1.25), ("eval/perplexity", 4, 3.5)]


def test_report_to_selects_sinks(tmp_path: Path) -> None:
    with make_reporter(tmp_path / "jsonl", report_to=["jsonl"]) as reporter:
        reporter.log(1, {"loss": 1.0})
    with make_reporter(tmp_path / "none", report_to=["none"]) as reporter:
        reporter.log(1, {"loss": 1.0})
    assert [p.name for p in (tmp_path / "jsonl").iterdir()] == ["metrics.jsonl"]
    assert list((tmp_path / "none").iterdir()) == []


def test_unknown_report_to_lists_allowed_values_even_when_disabled(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"report_to: .*'neptune'.*\['tensorboard', 'jsonl', 'csv', 'wandb', "
                                         r"'mlflow', 'none'\]"):
        make_reporter(tmp_path, report_to=["neptune"], enabled=False)


def test_none_cannot_be_combined_with_a_sink(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="report_to.*'none'"):
        make_reporter(tmp_path, report_to=["none", "jsonl"])


def test_disabled_writes_and_shows_nothing(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    output_dir = tmp_path / "run"
    with make_reporter(output_dir, enabled=False, show_progress=True) as reporter:
        reporter.advance(1)
        reporter.log(1, {"loss": 1.0})
    assert not output_dir.exists()
    assert capsys.readouterr() == ("", "")


# ----------------------------------------------------------------------------- resume


def test_resume_drops_stale_jsonl_lines(tmp_path: Path) -> None:
    with make_reporter(tmp_path, report_to=["jsonl"]) as reporter:
        for step in range(1, 6):
            reporter.log(step, {"loss": float(step)})
    with (tmp_path / "metrics.jsonl").open("a") as file:
        file.write('{"step": 6, "split": "tr')  # torn line from a kill mid-write
    with make_reporter(tmp_path, report_to=["jsonl"], initial_step=3) as reporter:
        reporter.log(4, {"loss": 40.0})
    records = read_jsonl(tmp_path / "metrics.jsonl")
    assert [(r["step"], r["loss"]) for r in records] == [(1, 1.0), (2, 2.0), (3, 3.0), (4, 40.0)]


def test_resume_purges_stale_tensorboard_events(tmp_path: Path) -> None:
    with make_reporter(tmp_path, report_to=["tensorboard"]) as reporter:
        for step in range(1, 6):
            reporter.log(step, {"loss": float(step)})
    with make_reporter(tmp_path, report_to=["tensorboard"], initial_step=3) as reporter:
        reporter.log(4, {"loss": 40.0})
    events = read_events(tmp_path / "tensorboard")
    starts = [e.step for e in events if e.HasField("session_log") and e.session_log.status == e.session_log.START]
    assert starts == [4]  # TensorBoard hides earlier events with step >= 4
    assert scalars(events)[-1] == ("train/loss", 4, 40.0)


def test_truncate_jsonl_keeps_file_untouched_when_nothing_is_stale(tmp_path: Path) -> None:
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1}\n{"step": 2}\n')
    before = path.stat().st_ino
    truncate_jsonl(path, 2)
    assert path.stat().st_ino == before
    truncate_jsonl(path, 1)
    assert path.read_text() == '{"step": 1}\n'
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.jsonl"], "no temporary file left"


# ----------------------------------------------------------------------------- console


def test_non_interactive_console_prints_plain_lines(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with make_reporter(tmp_path, report_to=["none"], show_progress=True) as reporter:
        for step in range(1, 4):
            reporter.advance(step)
        reporter.log(3, {"loss": 2.0, "learning_rate": 3e-4})
    err = capsys.readouterr().err
    assert err == "[train] step 3/10  loss 2  learning_rate 0.0003\n"


def test_interactive_console_shows_progress(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    # Force an interactive console: terminal detection is process-global and earlier tests that
    # fork worker processes can change it.
    import functools

    import rich.console

    import easytrain.reporting

    forced = functools.partial(rich.console.Console, force_terminal=True, force_interactive=True)
    monkeypatch.setattr(easytrain.reporting, "Console", forced)
    with make_reporter(tmp_path, report_to=["none"], show_progress=True, initial_step=2) as reporter:
        reporter.advance(3)
        reporter.log(4, {"loss": 1.5, "tokens_per_second": 12345.0})
    err = capsys.readouterr().err
    assert "loss 1.5 · 12.3k tok/s" in err
    assert "4/10" in err


def test_formatting_helpers() -> None:
    assert format_metrics({"loss": 2.345678, "learning_rate": 3e-4}) == "loss 2.346  learning_rate 0.0003"
    assert format_metrics({"tokens_per_second": 12345.6, "loss": float("nan")}) == "tokens_per_second 12346  loss nan"
    assert progress_description({"loss": 2.0, "learning_rate": 1e-5, "tokens_per_second": 2.5e6}) == (
        "loss 2 · lr 1e-05 · 2.5M tok/s"
    )
    assert progress_description({"grad_norm": 1.0}) == ""
    assert tensorboard_tag("eval", "eval_loss") == "eval/loss"
    assert tensorboard_tag("train", "eval_loss") == "train/eval_loss"
    assert parse_report_to("jsonl") == {"jsonl"}
    assert parse_report_to(["none"]) == set()


def test_writing_tensorboard_events_does_not_import_pytorch(tmp_path: Path) -> None:
    """tensorboardX's package tries `import torch` (about 1 s and 180 MiB where PyTorch is installed) for
    nothing the event sink uses; a process that had not imported PyTorch still has not after logging."""
    import subprocess
    import sys

    pytest.importorskip("torch")  # the test env installs it: otherwise nothing to show
    script = f"""
import sys
from pathlib import Path
import easytrain
from easytrain.reporting import Reporter
reporter = Reporter(output_dir={str(tmp_path)!r}, report_to=["tensorboard"], total_steps=2, show_progress=False)
reporter.log(1, {{"loss": 1.5}}, split="train")
reporter.close()
print("torch" in sys.modules)
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().splitlines()[-1] == "False", "PyTorch was imported"
    [event] = [e for e in read_events(tmp_path / "tensorboard") if e.summary.value]
    assert (event.step, event.summary.value[0].tag, event.summary.value[0].simple_value) == (1, "train/loss", 1.5)
