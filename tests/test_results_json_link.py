"""`results.json` is the `easytrain train` command's (`cli.run`), not the trainer's: a dangling link there refuses the
command before training (it would fail at its last write) but not a Python-API run, which never writes it; the command
writes it through a link, atomically (`sinks.write_json_atomically`)."""

import json
import os
import textwrap

import pytest

from easytrain import TrainingArguments
from easytrain.cli import run
from easytrain.errors import OutputDirError
from easytrain.trainers.run_dir import check_output_dir, command_outputs

from runs import args_for
from test_cli import HAND_WRITTEN


def _dangling_results(run_dir):
    run_dir.mkdir()
    (run_dir / "results.json").symlink_to(run_dir.parent / "unmounted" / "results.json")


def test_a_python_api_run_is_not_refused_a_dangling_results_json_it_never_writes(tmp_path):
    _dangling_results(tmp_path / "run")
    assert check_output_dir(args_for(tmp_path / "run")) is None
    assert (tmp_path / "run" / "results.json").is_symlink(), "left as it is"


def test_the_command_is_refused_a_dangling_results_json_before_training(tmp_path):
    _dangling_results(tmp_path / "run")
    with command_outputs(("results.json",)):
        with pytest.raises(OutputDirError, match="results.json links to '.*unmounted/results.json'.*does not exist"):
            check_output_dir(args_for(tmp_path / "run"))
    assert check_output_dir(args_for(tmp_path / "run")) is None, "only while the command runs"
    with pytest.raises(OutputDirError, match="results.json links to"):
        run(args_for(tmp_path / "run"))
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["results.json"], "nothing trained or written"


def _hand_written_args(tmp_path, monkeypatch) -> TrainingArguments:
    (tmp_path / "hand_written_trainer.py").write_text(textwrap.dedent(HAND_WRITTEN))
    monkeypatch.syspath_prepend(str(tmp_path))
    return TrainingArguments(task="hand_written_trainer:LinearRegressionTrainer", max_steps=2,
                             output_dir=str(tmp_path / "out"))


def test_results_json_is_written_through_its_link(tmp_path, monkeypatch):
    args = _hand_written_args(tmp_path, monkeypatch)
    target = tmp_path / "scratch" / "results.json"
    target.parent.mkdir()
    target.write_text("{}")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "results.json").symlink_to(target)
    summary = run(args)
    assert os.readlink(tmp_path / "out" / "results.json") == str(target)
    assert json.loads(target.read_text())["train_loss"] == summary["train_loss"]
    assert sorted(p.name for p in target.parent.iterdir()) == ["results.json"], "no temporary file left there"


def test_a_task_not_built_on_base_trainer_is_refused_a_dangling_results_json_before_training(tmp_path, monkeypatch):
    """A `--task` trainer of its own (no `check_output_dir`): the command checks the link it writes itself before the
    trainer trains, with the check's message, not at its last write once training is done."""
    args = _hand_written_args(tmp_path, monkeypatch)
    _dangling_results(tmp_path / "out")
    with pytest.raises(OutputDirError, match="results.json links to '.*unmounted/results.json', which does not exist"):
        run(args)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["results.json"], "no job.json: nothing trained"
