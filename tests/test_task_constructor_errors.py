"""`--task package.module:Class` whose constructor raises TypeError: a class that cannot take the training
arguments (a wrong --task, fixed on the command line) is refused with exit status 2 and what --task needs; a
TypeError raised inside a constructor that does take them (a bug in that code) keeps its traceback."""

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from easytrain import ArgumentError, TrainingArguments
from easytrain.cli import main, run

from runs import child_env

TASKS = textwrap.dedent('''
    import easytrain


    class TakesNothing:
        """Built with no arguments: not a trainer --task can build."""

        def __init__(self):
            pass


    class Buggy(easytrain.BaseTrainer):
        """A trainer that takes the training arguments, then fails inside."""

        def __init__(self, arguments):
            self.size = len(arguments.output_dir) + None  # a bug in the task's own code


    class Chooser:
        """A trainer factory written as a class: its __new__ returns the trainer, not an instance of it."""

        def __new__(cls, arguments):
            return easytrain.BaseTrainer(arguments)
    ''')


@pytest.fixture
def tasks_module(tmp_path, monkeypatch):
    (tmp_path / "ctor_error_tasks.py").write_text(TASKS)
    monkeypatch.syspath_prepend(str(tmp_path))
    yield "ctor_error_tasks"
    sys.modules.pop("ctor_error_tasks", None)


def test_a_class_that_cannot_take_the_training_arguments_is_refused_with_exit_2(tasks_module, tmp_path, capsys):
    with pytest.raises(ArgumentError, match=r"task: 'ctor_error_tasks:TakesNothing' cannot be built as Takes"
                                            r"Nothing\(training_arguments\): it takes TakesNothing\(\) \(too many"):
        run(TrainingArguments(task=f"{tasks_module}:TakesNothing", output_dir=str(tmp_path / "a")))
    assert main(["train", "--task", f"{tasks_module}:TakesNothing", "--output_dir", str(tmp_path / "b")]) == 2
    assert "cannot be built as TakesNothing(training_arguments)" in capsys.readouterr().err


def test_a_type_error_inside_the_constructor_keeps_its_traceback(tasks_module, tmp_path):
    with pytest.raises(TypeError, match="unsupported operand") as raised:
        run(TrainingArguments(task=f"{tasks_module}:Buggy", output_dir=str(tmp_path / "a")))
    assert not isinstance(raised.value, ArgumentError)
    frames = [(entry.name, Path(entry.path).name) for entry in raised.traceback]
    assert ("__init__", "ctor_error_tasks.py") in frames, frames


def test_the_command_exits_1_with_the_traceback_of_the_bug(tasks_module, tmp_path):
    done = subprocess.run([sys.executable, "-m", "easytrain", "train", "--task", f"{tasks_module}:Buggy",
                           "--output_dir", str(tmp_path / "out")], capture_output=True, text=True, timeout=300,
                          env=child_env(PYTHONPATH=f"{child_env()['PYTHONPATH']}:{tmp_path}"))
    assert done.returncode == 1, done.stderr[-2000:]
    assert "Traceback" in done.stderr and "ctor_error_tasks.py" in done.stderr
    assert "self.size = len(arguments.output_dir) + None" in done.stderr


#: `--task module:attribute` naming something importable that is no trainer: each refused as `task`, saying what
#: --task takes, before anything runs (print would print the arguments; OrderedDict raised a bare TypeError).
NOT_TRAINERS = {"collections:OrderedDict": "not a trainer", "math:pi": "not callable",
                "os.path:join": "not a trainer", "builtins:print": "built-in function",
                "argparse:Namespace": "cannot be built as Namespace(training_arguments)"}


@pytest.mark.parametrize("target", sorted(NOT_TRAINERS))
def test_an_importable_object_that_is_no_trainer_is_refused_as_task(target, tmp_path, capsys):
    with pytest.raises(ArgumentError) as refused:
        run(TrainingArguments(task=target, output_dir=str(tmp_path / "out")))
    assert refused.value.field == "task" and NOT_TRAINERS[target] in refused.value.message, refused.value.message
    assert "--task takes" in refused.value.message, refused.value.message
    assert capsys.readouterr().out == ""  # nothing called that prints


def test_a_trainer_class_by_import_path_is_built(tmp_path):
    from easytrain import BaseTrainer
    from easytrain.tasks.registry import resolve_task

    trainer = resolve_task("easytrain:BaseTrainer").build(TrainingArguments(output_dir=str(tmp_path)))
    assert type(trainer) is BaseTrainer


def test_a_class_whose_new_returns_a_trainer_is_built_as_a_factory(tasks_module, tmp_path):
    """A class with none of the trainer's methods is no trainer, unless its own __new__ makes something else: then
    it is a factory(training_arguments), called as one."""
    from easytrain import BaseTrainer
    from easytrain.tasks.registry import resolve_task

    trainer = resolve_task(f"{tasks_module}:Chooser").build(TrainingArguments(output_dir=str(tmp_path)))
    assert type(trainer) is BaseTrainer
