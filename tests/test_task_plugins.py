"""Tasks as plugins: `@register_task` with argument dataclasses, lazy 'module:Class' strings, the
`easytrain.tasks` entry-point group of an installed package, `easytrain tasks` and `--task NAME --help`."""

import inspect
import json
import subprocess
import sys
import textwrap
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml

from easytrain import ArgumentError, TrainingArguments
from easytrain.cli import main, run
from easytrain.config_io import parse_task_arguments, peek_task
from easytrain.tasks import register_task, resolve_task, task_names, unregister_task

from runs import child_env

ROOT = Path(__file__).resolve().parents[1]

class ToyTrainer:
    """Counts toys."""

    def __init__(self, arguments, toy):
        self.arguments, self.toy = arguments, toy

    dataset_train = dataset_eval = model = state = dtype = param_dtype = optimizer = scheduler = None

    def configure_model(self): return None
    def configure_dataloaders(self): return None
    def configure_functions(self): return None
    def train(self): return {"loss": float(self.toy.toy_option)}
    def evaluate(self): return {"eval_toy_label": self.toy.toy_label}
    def save_pretrained(self, directory): return directory


# A TrainerProtocol implementation without any JAX work (it reports its option back), as source for the
# modules and the plugin package the tests write.
TOY_TRAINER = inspect.getsource(ToyTrainer)


@dataclass
class ToyArguments:
    """Settings of the toy task."""

    toy_option: int = field(default=1, metadata={"help": "How many toys to count."})
    toy_label: str = field(default="plain", metadata={"help": "A label reported back as eval_toy_label."})


@pytest.fixture
def toy_task():
    """'unit_toy' registered with the decorator for one test."""
    trainer = register_task("unit_toy", arguments=(ToyArguments,), description="A toy for unit tests.")(ToyTrainer)
    yield trainer
    unregister_task("unit_toy")


def test_decorator_registers_and_returns_the_class(toy_task):
    assert toy_task is ToyTrainer
    task = resolve_task("unit_toy")
    assert task.target is ToyTrainer and task.arguments == (ToyArguments,)
    assert task.description == "A toy for unit tests." and "unit_toy" in task_names()


def test_run_passes_task_arguments_to_the_factory(toy_task, tmp_path):
    args = TrainingArguments(task="unit_toy", output_dir=str(tmp_path))
    assert run(args)["train_loss"] == 1.0  # the dataclass defaults when none are given
    assert run(args, [ToyArguments(toy_option=4)])["train_loss"] == 4.0


def test_decorated_factory_function(tmp_path):
    @register_task("unit_factory", arguments=(ToyArguments,))
    def make(arguments, toy):
        """Builds a ToyTrainer with a doubled option."""
        return ToyTrainer(arguments, ToyArguments(toy.toy_option * 2))

    try:
        assert resolve_task("unit_factory").description == "Builds a ToyTrainer with a doubled option."
        assert main(["train", "--task", "unit_factory", "--toy_option", "5", "--output_dir", str(tmp_path)]) == 0
        assert json.loads((tmp_path / "results.json").read_text())["train_loss"] == 10.0
    finally:
        unregister_task("unit_factory")


def test_command_line_parses_task_fields_next_to_training_arguments(toy_task):
    args, (toy,) = parse_task_arguments(["--task", "unit_toy", "--toy_option", "5", "--max_steps", "7"],
                                        (ToyArguments,), "unit_toy")
    assert args.task == "unit_toy" and args.max_steps == 7 and toy == ToyArguments(toy_option=5)
    with pytest.raises(ArgumentError, match="Did you mean --toy_option"):
        parse_task_arguments(["--toy_opton", "5"], (ToyArguments,), "unit_toy")


def test_main_trains_a_registered_task_with_its_option(toy_task, tmp_path, capsys):
    assert main(["train", "--task", "unit_toy", "--toy_option", "3", "--toy_label", "x",
                 "--output_dir", str(tmp_path)]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1]) == {"train_loss": 3.0, "eval_toy_label": "x"}


def test_help_shows_the_task_fields_in_their_own_group(toy_task, capsys):
    assert main(["train", "--task", "unit_toy", "--help"]) == 0
    out = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    assert "task 'unit_toy' arguments (ToyArguments)" in out and "training arguments (TrainingArguments" in out
    assert "--toy_option" in out and "How many toys to count." in out and "--learning_rate" in out
    assert "A toy for unit tests." in out


@pytest.mark.parametrize("suffix", [".yaml", ".json"])
def test_config_file_holds_task_fields(toy_task, tmp_path, suffix):
    values = {"task": "unit_toy", "toy_option": 7, "toy_label": "from-file", "output_dir": str(tmp_path / "run")}
    path = tmp_path / f"config{suffix}"
    path.write_text(yaml.safe_dump(values) if suffix == ".yaml" else json.dumps(values))
    assert main(["train", "--config", str(path), "--toy_label", "flag"]) == 0  # the task comes from the file
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert results == {"train_loss": 7.0, "eval_toy_label": "flag"}  # the command line wins over the file


def test_the_task_flag_wins_over_the_config_files_task(toy_task, tmp_path):
    """As every other flag does: `--task unit_toy --config sft.yaml` runs the toy task with the file's other values."""
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump({"task": "sft", "toy_option": 5, "output_dir": str(tmp_path / "run")}))
    assert peek_task(["--config", str(path)]) == "sft"
    assert peek_task(["--task", "unit_toy", "--config", str(path)]) == "unit_toy"
    assert main(["train", "--task", "unit_toy", "--config", str(path)]) == 0
    assert json.loads((tmp_path / "run" / "results.json").read_text())["train_loss"] == 5.0


def test_arguments_json_holds_the_task_fields_so_it_reruns_the_same_job(tmp_path):
    """A task's own fields are saved beside TrainingArguments: `--config runs/x/arguments.json` (the documented
    resume) rebuilds both, instead of the task's defaults."""
    from easytrain import BaseTrainer, load_arguments
    from easytrain.trainers.run_dir import rerun_arguments
    from easytrain.trainers.sft import SFTArguments, SFTTrainer

    class Saving(BaseTrainer):
        def __init__(self, arguments, toy):
            super().__init__(arguments)

    register_task("unit_saving", arguments=(ToyArguments,))(Saving)
    try:
        args = TrainingArguments(task="unit_saving", output_dir=str(tmp_path / "custom"), max_steps=3)
        path = resolve_task("unit_saving").build(args, [ToyArguments(toy_option=7, toy_label="x")]).save_arguments()
        assert json.loads(path.read_text())["toy_option"] == 7
        assert parse_task_arguments(["--config", str(path)], (ToyArguments,), "unit_saving") == (
            rerun_arguments(args), (ToyArguments(toy_option=7, toy_label="x"),))
        assert load_arguments(path) == rerun_arguments(args)  # TrainingArguments alone, as before
    finally:
        unregister_task("unit_saving")
    sft = SFTArguments(packing=True, truncation_side="left")  # built in Python, not through the command line
    args = TrainingArguments(task="sft", output_dir=str(tmp_path / "sft"))
    path = SFTTrainer(args, sft).save_arguments()
    assert parse_task_arguments(["--config", str(path)], (SFTArguments,), "sft") == (rerun_arguments(args), (sft,))


def test_unknown_config_key_suggests_a_task_field(toy_task, tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("task: unit_toy\ntoy_opton: 3\n")
    with pytest.raises(ArgumentError, match="toy_opton.*Did you mean 'toy_option'"):
        parse_task_arguments(["--config", str(path)], (ToyArguments,), "unit_toy")


@dataclass
class ClashesWithTraining:
    learning_rate: float = field(default=0.1, metadata={"help": "Declared twice."})


@dataclass
class ClashesWithNoFlag:
    no_async_checkpointing: bool = field(default=False, metadata={"help": "Same flag as --no_async_checkpointing."})


@dataclass
class ClashesWithConfig:
    config: str = field(default="", metadata={"help": "Same flag as --config."})


@dataclass
class ToyDuplicate:
    toy_option: int = field(default=2, metadata={"help": "Declared by ToyArguments too."})


@pytest.mark.parametrize("classes, flag, owner", [
    ((ClashesWithTraining,), "--learning_rate", "TrainingArguments"),
    ((ClashesWithNoFlag,), "--no_async_checkpointing", "TrainingArguments"),
    ((ClashesWithConfig,), "--config", "the config-file flag"),
    ((ToyArguments, ToyDuplicate), "--toy_option", "ToyArguments"),
])
def test_a_flag_declared_twice_is_refused_naming_it(classes, flag, owner):
    with pytest.raises(ArgumentError, match=f"{flag} is declared by both {owner} and") as caught:
        register_task("unit_clash", arguments=classes)(ToyTrainer)
    assert caught.value.field == flag.removeprefix("--")
    assert "unit_clash" not in task_names()


def test_a_single_dataclass_needs_no_tuple(tmp_path):
    register_task("unit_single", arguments=ToyArguments)(ToyTrainer)
    try:
        assert resolve_task("unit_single").arguments == (ToyArguments,)
    finally:
        unregister_task("unit_single")


def test_arguments_must_be_dataclass_classes():
    with pytest.raises(ArgumentError, match="dataclass classes"):
        register_task("unit_bad", arguments=(ToyArguments(),))(ToyTrainer)


def test_unknown_task_names_the_available_ones(toy_task, capsys):
    with pytest.raises(ArgumentError, match=r"unknown task 'nope'; available: .*lm.*unit_toy"):
        resolve_task("nope")
    assert main(["train", "--task", "nope"]) == 2
    assert "unknown task 'nope'" in capsys.readouterr().err


def test_a_taken_name_is_refused_unless_replaced(toy_task):
    with pytest.raises(ArgumentError, match="already registered"):
        register_task("unit_toy", "somewhere.else:Trainer")
    register_task("unit_toy", "somewhere.else:Trainer", replace=True)
    with pytest.raises(ArgumentError, match="cannot import 'somewhere.else:Trainer'"):
        resolve_task("unit_toy")


def test_string_form_is_imported_lazily(tmp_path, monkeypatch):
    (tmp_path / "lazy_toy_module.py").write_text(textwrap.dedent(TOY_TRAINER))
    monkeypatch.syspath_prepend(str(tmp_path))
    register_task("unit_lazy", "lazy_toy_module:ToyTrainer", arguments=(ToyArguments,))
    try:
        assert "lazy_toy_module" not in sys.modules
        assert run(TrainingArguments(task="unit_lazy", output_dir=str(tmp_path / "out")))["train_loss"] == 1.0
        assert "lazy_toy_module" in sys.modules and resolve_task("unit_lazy").description == "Counts toys."
    finally:
        unregister_task("unit_lazy")


def test_import_path_task_keeps_its_decorated_arguments(tmp_path, monkeypatch):
    (tmp_path / "path_toy_module.py").write_text(textwrap.dedent('''
        from dataclasses import dataclass, field
        from easytrain.tasks import register_task

        @dataclass
        class PathArguments:
            toy_option: int = field(default=6, metadata={"help": "h"})
            toy_label: str = field(default="path", metadata={"help": "h"})
        ''') + textwrap.dedent(TOY_TRAINER).replace(
        "class ToyTrainer:", '@register_task("unit_path", arguments=(PathArguments,))\nclass ToyTrainer:'))
    monkeypatch.syspath_prepend(str(tmp_path))
    try:
        task = resolve_task("path_toy_module:ToyTrainer")
        assert [cls.__name__ for cls in task.arguments] == ["PathArguments"] and task.description == "Counts toys."
        summary = run(TrainingArguments(task="path_toy_module:ToyTrainer", output_dir=str(tmp_path / "out")))
        assert summary == {"train_loss": 6.0, "eval_toy_label": "path"}
    finally:
        unregister_task("unit_path")


def test_protocol_is_still_checked(tmp_path):
    @register_task("unit_incomplete")
    class Incomplete:
        def __init__(self, arguments):
            self.arguments = arguments

    try:
        with pytest.raises(ArgumentError, match="does not implement easytrain.TrainerProtocol: it lacks"):
            run(TrainingArguments(task="unit_incomplete", output_dir=str(tmp_path)))
    finally:
        unregister_task("unit_incomplete")


def test_tasks_command_lists_registered_tasks(toy_task, capsys):
    assert main(["tasks"]) == 0
    out = capsys.readouterr().out
    assert "lm" in out and "built-in" in out and "unit_toy" in out and "A toy for unit tests." in out


# ----------------------------------------------------------------------------- an installed plugin

PLUGIN_PYPROJECT = '''
[build-system]
requires = ["setuptools>=68"]
build-backend = "setuptools.build_meta"

[project]
name = "easytrain-toy-plugin"
version = "0.0.1"

[project.entry-points."easytrain.tasks"]
toy = "easytrain_toy_plugin:ToyTrainer"

[tool.setuptools]
py-modules = ["easytrain_toy_plugin"]
'''

PLUGIN_MODULE = '''
"""A third-party task, found through the `easytrain.tasks` entry-point group."""
from dataclasses import dataclass, field

from easytrain.tasks import register_task


@dataclass
class ToyArguments:
    toy_option: int = field(default=1, metadata={"help": "How many toys the plugin counts."})
    toy_label: str = field(default="plugin", metadata={"help": "A label reported back."})

''' + TOY_TRAINER.replace("class ToyTrainer:", '@register_task("toy", arguments=(ToyArguments,), '
                          'description="Counts toys, from an installed plugin.")\nclass ToyTrainer:')


def _pip(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "pip", *args, "-q", "--disable-pip-version-check"], check=True,
                   capture_output=True, text=True, timeout=300)


def _easytrain(*argv: str, cwd: Path) -> subprocess.CompletedProcess:
    env = child_env(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", JAX_PLATFORMS="cpu")
    return subprocess.run([sys.executable, "-m", "easytrain", *argv], capture_output=True, text=True, timeout=300,
                          env=env, cwd=cwd, check=False)


@pytest.mark.slow
def test_an_installed_package_adds_a_task_through_its_entry_point(tmp_path):
    package = tmp_path / "plugin"
    package.mkdir()
    (package / "pyproject.toml").write_text(PLUGIN_PYPROJECT)
    (package / "easytrain_toy_plugin.py").write_text(PLUGIN_MODULE)
    _pip("install", "--no-deps", "--no-build-isolation", str(package))
    try:
        listed = _easytrain("tasks", cwd=tmp_path)
        assert listed.returncode == 0, listed.stderr[-2000:]
        toy_line = next(line for line in listed.stdout.splitlines() if line.strip().startswith("toy "))
        assert "Counts toys, from an installed plugin." in toy_line and "easytrain-toy-plugin" in toy_line

        helped = _easytrain("train", "--task", "toy", "--help", cwd=tmp_path)
        assert helped.returncode == 0, helped.stderr[-2000:]
        assert "--toy_option" in helped.stdout and "How many toys the plugin counts." in helped.stdout

        trained = _easytrain("train", "--task", "toy", "--toy_option", "3", "--output_dir", str(tmp_path / "run"),
                             cwd=tmp_path)
        assert trained.returncode == 0, trained.stderr[-2000:]
        assert json.loads(trained.stdout.strip().splitlines()[-1]) == {"train_loss": 3.0, "eval_toy_label": "plugin"}
        assert json.loads((tmp_path / "run" / "results.json").read_text())["train_loss"] == 3.0
    finally:
        _pip("uninstall", "-y", "easytrain-toy-plugin")
