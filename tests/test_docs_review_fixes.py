"""Fixes from a review of the docs against the code: the pages' examples run as written, and the behaviour
they show (`--fsdp_size -1` alone, `--eval_metrics none`, `easytrain plot runs/*/`) is the real one."""

import json
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
from doc_snippets import python_blocks, run_block
from runs import child_env, xla_flags

from easytrain.config_io import parse_task_arguments
from easytrain.errors import ArgumentError
from easytrain.sharding import resolve_mesh_shape
from easytrain.tasks import resolve_task, unregister_task

ROOT = Path(__file__).resolve().parents[1]
TASKS_PAGE = ROOT / "docs" / "tasks.md"
BASH = re.compile(r"^```bash[ \t]*\n(.*?)^```[ \t]*$", re.MULTILINE | re.DOTALL)


# ----------------------------------------------------------------------------- docs/tasks.md


@pytest.fixture
def tasks_page(monkeypatch, tmp_path):
    """The page's python blocks, with every task they register forgotten afterwards."""
    from easytrain.tasks import registry

    before = set(registry._REGISTRY)
    monkeypatch.chdir(tmp_path)
    yield python_blocks(TASKS_PAGE)
    for name in set(registry._REGISTRY) - before:
        unregister_task(name)


def test_the_tasks_page_registers_its_example_tasks_as_written(tasks_page):
    namespace: dict = {"__name__": "doc"}
    for block in tasks_page[:2]:  # the example task and its factory variant
        run_block(block, namespace)
    for line in BASH.search(TASKS_PAGE.read_text()).group(1).splitlines():  # the page's first commands
        argv = shlex.split(line.split("#")[0])[2:]
        if "--task" in argv and "--help" not in argv:
            task = resolve_task(argv[argv.index("--task") + 1])
            parse_task_arguments(argv, task.arguments, task.name)


def test_the_tasks_page_python_runs_write_distinct_output_dirs(tasks_page, tmp_path, monkeypatch):
    """The 'From Python' block imports the plugin module the page defines and runs two jobs."""
    plugin = next(block for block in tasks_page if "class ToyTrainer" in block.source)
    (tmp_path / "easytrain_toy.py").write_text(plugin.source)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "easytrain_toy", raising=False)
    output_dirs = []
    monkeypatch.setattr("easytrain.cli.run", lambda arguments, task_arguments=None: output_dirs.append(
        arguments.output_dir))
    run_block(next(block for block in tasks_page if "from easytrain.cli import run" in block.source), {})
    sys.modules.pop("easytrain_toy", None)
    assert len(output_dirs) == 2 and len(set(output_dirs)) == 2, output_dirs


# ----------------------------------------------------------------------------- mesh: --fsdp_size -1 alone


def test_fsdp_or_tensor_minus_one_takes_the_devices_the_default_data_axis_leaves():
    assert resolve_mesh_shape({"data": -1, "fsdp": -1, "tensor": 1}, 4) == {"data": 1, "fsdp": 4, "tensor": 1}
    assert resolve_mesh_shape({"data": -1, "fsdp": -1, "tensor": 2}, 8) == {"data": 1, "fsdp": 4, "tensor": 2}
    assert resolve_mesh_shape({"data": -1, "fsdp": 2, "tensor": -1}, 8) == {"data": 1, "fsdp": 2, "tensor": 4}
    with pytest.raises(ArgumentError, match="only one of fsdp_size and tensor_parallel_size may be -1"):
        resolve_mesh_shape({"data": -1, "fsdp": -1, "tensor": -1}, 8)
    with pytest.raises(ArgumentError, match="not divisible"):
        resolve_mesh_shape({"data": -1, "fsdp": -1, "tensor": 3}, 8)


def test_the_command_line_fsdp_minus_one_builds_a_mesh_on_four_devices():
    script = ("from easytrain.config_io import parse_arguments; from easytrain.sharding import make_mesh; "
              "a = parse_arguments(['--fsdp_size', '-1']); "
              "print(dict(make_mesh(a.data_parallel_size, a.fsdp_size, a.tensor_parallel_size).shape))")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                            env=child_env(XLA_FLAGS=xla_flags(4), JAX_PLATFORMS="cpu"))
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip().splitlines()[-1] == "{'data': 1, 'fsdp': 4, 'tensor': 1}"


# ----------------------------------------------------------------------------- --eval_metrics none


def test_eval_metrics_none_on_the_command_line_is_no_metrics(tmp_path):
    from easytrain.config_io import parse_arguments

    assert parse_arguments(["--output_dir", str(tmp_path), "--eval_metrics", "none"]).eval_metrics == []
    with pytest.raises(ArgumentError, match="'none' alone"):
        parse_arguments(["--output_dir", str(tmp_path), "--eval_metrics", "none", "accuracy"])


# ----------------------------------------------------------------------------- easytrain plot runs/*/


def test_plot_skips_directories_without_metrics_and_names_them(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    from easytrain.cli import main

    good, refused = tmp_path / "runs" / "good", tmp_path / "runs" / "refused"
    good.mkdir(parents=True)
    refused.mkdir()
    (refused / "job.json").write_text("{}")
    (good / "metrics.jsonl").write_text("".join(json.dumps({"step": step, "split": "train", "loss": 3.0 / step})
                                                + "\n" for step in (1, 2, 3)))
    assert main(["plot", str(good), str(refused), "--out", str(tmp_path / "figures")]) == 0
    assert (tmp_path / "figures" / "loss.png").is_file()
    assert f"skipping {refused}" in capsys.readouterr().err
    assert main(["plot", str(refused), "--out", str(tmp_path / "none")]) == 2
