"""`parse_arguments()` and `parse_task_arguments()` in a training script of one's own name that script in their help
and errors, as argparse does (they named `easytrain train`, a command the user never ran); the `easytrain train`
command keeps its own name. Another task's flag (or config key) in such a script names the parse that reads it
(`parse_task_arguments` with that task's dataclasses), not `--task`, which changes nothing there."""

import subprocess
import sys

import pytest

from easytrain.cli import main
from easytrain.config_io import CLI_PROG, parse_arguments, parse_task_arguments
from easytrain.errors import ArgumentError
from easytrain.tasks import resolve_task
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
    code, text = exit_output(capsys, lambda: main(["train", "--max_steps", "x"]))
    assert code == 2 and "easytrain train: error: argument --max_steps" in text, text
    code, text = exit_output(capsys, lambda: parse_task_arguments(["--max_steps", "x"], (), "lm", prog=CLI_PROG))
    assert code == 2 and "easytrain train: error: argument --max_steps" in text, text


def test_a_scripts_parse_task_arguments_names_the_script(monkeypatch, capsys):
    """docs/tasks.md offers `parse_task_arguments(argv, task.arguments, task.name)` to a script of one's own."""
    monkeypatch.setattr(sys, "argv", ["my_train.py", "--help"])
    task = resolve_task("dpo")
    code, text = exit_output(capsys, lambda: parse_task_arguments(None, task.arguments, task.name))
    assert code == 0 and text.startswith("usage: my_train.py [--config FILE]"), text[:300]
    assert "--task NAME" not in text and "easytrain tasks" not in text and "--beta" in text, text[:300]


def refusal(parse) -> str:
    with pytest.raises(ArgumentError) as refused:
        parse()
    return str(refused.value)


@pytest.mark.parametrize("flags", [["--beta", "0.1"], ["--task", "dpo", "--beta", "0.1"]])
def test_another_tasks_flag_in_a_script_names_the_parse_that_reads_it(tmp_path, flags):
    """`--task dpo` is a TrainingArguments field there: it does not make parse_arguments read DPO's flags."""
    text = refusal(lambda: parse_arguments(["--output_dir", str(tmp_path), *flags]))
    assert "--beta is an argument of task 'dpo'" in text and "reads TrainingArguments only" in text, text
    assert "parse_task_arguments(argv, task.arguments, task.name)" in text and "resolve_task('dpo')" in text, text
    assert "easytrain train" not in text and "add --task" not in text, text


def test_another_tasks_config_key_in_a_script_names_the_parse_that_reads_it(tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text(f"output_dir: {tmp_path}\ntask: dpo\nbeta: 0.1\n")
    text = refusal(lambda: parse_arguments(["--config", str(config)]))
    assert "beta: an argument of task 'dpo'" in text and "reads TrainingArguments only" in text, text
    assert "resolve_task('dpo')" in text and "add `task: dpo`" not in text and "--task dpo" not in text, text


def test_a_scripts_task_parse_names_the_task_it_reads(tmp_path):
    sft = resolve_task("sft")
    text = refusal(lambda: parse_task_arguments(["--output_dir", str(tmp_path), "--beta", "0.1"], sft.arguments,
                                                sft.name))
    assert "--beta is an argument of task 'dpo'" in text and "reads TrainingArguments and task 'sft'" in text, text
    assert "resolve_task('dpo')" in text and "easytrain train" not in text, text


def test_a_scripts_task_parse_gives_its_task_and_refuses_another(tmp_path):
    """A script that parses task 'dpo''s arguments (the advice above) gets `task='dpo'`, so `easytrain.cli.run` builds
    a DPO trainer; it gave the default task, which `run` refused for its DPO arguments. Another task named on the
    command line or in a config file is refused, not silently paired with DPO's arguments."""
    dpo = resolve_task("dpo")
    arguments, (dpo_arguments,) = parse_task_arguments(["--beta", "0.2"], dpo.arguments, dpo.name)
    assert arguments.task == "dpo" and dpo_arguments.beta == 0.2
    config = tmp_path / "c.yaml"
    config.write_text("task: sft\nbeta: 0.2\n")
    for argv in (["--task", "sft", "--beta", "0.2"], ["--config", str(config)]):
        with pytest.raises(ArgumentError, match=r"^task: this parse reads the arguments of task 'dpo', but .* names "
                                                r"task 'sft'.*resolve_task\('sft'\)"):
            parse_task_arguments(argv, dpo.arguments, dpo.name)
    assert parse_task_arguments(["--task", "dpo"], dpo.arguments, dpo.name)[0].task == "dpo"


def test_a_scripts_unknown_flag_points_to_the_scripts_own_help(monkeypatch, tmp_path):
    """`easytrain train --help` does not list a script's task flags (nor is it what the user ran)."""
    monkeypatch.setattr(sys, "argv", ["my_train.py"])
    sft = resolve_task("sft")
    config = tmp_path / "c.yaml"
    config.write_text("zzzz: 1\n")
    for argv in (["--zzzz", "1"], ["--config", str(config)]):
        with pytest.raises(ArgumentError) as refused:
            parse_task_arguments(argv, sft.arguments, sft.name)
        assert "Run `my_train.py --help` for the list." in str(refused.value), str(refused.value)
    with pytest.raises(ArgumentError, match=r"Run `easytrain train --help` for the list\."):
        parse_task_arguments(["--zzzz", "1"], (), "lm", CLI_PROG)
    with pytest.raises(ArgumentError, match=r"Run `easytrain train --task sft --help` for the list\."):
        parse_task_arguments(["--task", "sft", "--zzzz", "1"], sft.arguments, sft.name, CLI_PROG)
