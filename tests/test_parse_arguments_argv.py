"""`parse_arguments()` and `parse_task_arguments()` without an argument read the command line (`sys.argv[1:]`), as
argparse and HfArgumentParser do, so a training script of one's own takes flags; `[]` means no flags."""

import sys

import pytest

from easytrain.arguments import TrainingArguments
from easytrain.errors import ArgumentError
from easytrain.config_io import parse_arguments, parse_task_arguments
from easytrain.trainers.dpo import DPOArguments


def test_parse_arguments_without_argv_reads_the_command_line(monkeypatch, tmp_path):
    monkeypatch.setattr(sys, "argv", ["my_train.py", "--max_steps", "5", "--output_dir", str(tmp_path)])
    arguments = parse_arguments()
    assert (arguments.max_steps, arguments.output_dir) == (5, str(tmp_path))


def test_parse_task_arguments_without_argv_reads_the_command_line(monkeypatch):
    monkeypatch.setattr(sys, "argv", ["my_train.py", "--max_steps", "5", "--beta", "0.3"])
    arguments, (dpo,) = parse_task_arguments(task_arguments=(DPOArguments,), task="dpo")
    assert (arguments.max_steps, dpo.beta) == (5, 0.3)


def test_an_empty_argv_means_no_flags(monkeypatch):
    monkeypatch.setattr(sys, "argv", ["my_train.py", "--max_steps", "5"])
    assert parse_arguments([]).max_steps == TrainingArguments().max_steps != 5


def test_a_notebook_kernels_flags_are_refused_saying_where_they_came_from(monkeypatch):
    """A Jupyter kernel runs with `-f kernel.json`: the refusal says the flags came from sys.argv and that [] gives
    none, instead of only "unknown command-line argument '-f'", which the user never typed."""
    monkeypatch.setattr(sys, "argv", ["ipykernel_launcher.py", "-f", "/tmp/kernel-1234.json"])
    with pytest.raises(ArgumentError, match=r"read from the command line .*'-f'.*pass \[\] for none"):
        parse_arguments()
    assert parse_arguments([]).max_steps == TrainingArguments(output_dir="x").max_steps
