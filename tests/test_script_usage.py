"""`parse_arguments()` in a training script of one's own names that script in its help and errors, as argparse
does (it named `easytrain train`, a command the user never ran); the `easytrain train` command keeps its own name."""

import subprocess
import sys

import pytest

from easytrain.cli import main
from easytrain.config_io import parse_arguments, parse_task_arguments
from runs import child_env


def exit_output(capsys, parse) -> tuple[int, str]:
    """The exit status and what argparse printed (help to stdout, an error to stderr)."""
    with pytest.raises(SystemExit) as exited:
        parse()
    printed = capsys.readouterr()
    return exited.value.code, printed.out + printed.err


def test_a_scripts_help_names_the_script(monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["my_train.py", "--help"])
    code, text = exit_output(capsys, parse_arguments)
    assert code == 0 and text.startswith("usage: my_train.py [--config FILE] [--FIELD VALUE ...]"), text[:300]
    assert "easytrain train" not in text, text[:300]
    assert "--max_steps" in text  # every field is still listed


def test_a_scripts_error_names_the_script(monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["my_train.py", "--max_steps", "x"])
    code, text = exit_output(capsys, parse_arguments)
    assert code == 2 and "my_train.py: error: argument --max_steps" in text and "easytrain" not in text, text


def test_a_script_run_by_python_names_itself(tmp_path):
    script = tmp_path / "finetune.py"
    script.write_text("import easytrain\neasytrain.parse_arguments()\n")
    done = subprocess.run([sys.executable, str(script), "--help"], capture_output=True, text=True, timeout=120,
                          env=child_env(HF_HUB_OFFLINE="1"))
    assert done.returncode == 0 and done.stdout.startswith("usage: finetune.py "), done.stdout[:300] + done.stderr


def test_the_easytrain_command_keeps_its_name(capsys):
    assert main(["train", "--help"]) == 0
    assert capsys.readouterr().out.startswith("usage: easytrain train [--task NAME] [--config FILE]")
    code, text = exit_output(capsys, lambda: parse_task_arguments(["--max_steps", "x"], (), "lm"))
    assert code == 2 and "easytrain train: error: argument --max_steps" in text, text
