"""`arguments.json` names the task of the trainer that ran, so `easytrain train --config <run>/arguments.json` rebuilds
it: an SFTTrainer or DPOTrainer built in Python (whose arguments keep the default task 'lm') records 'sft' or 'dpo',
a subclass in an importable module its 'package.module:Class' path. A refused resume lists no launch field
(`coordinator_address`, `num_processes`, `process_id`: each process's own) as a changed argument."""

import json
import logging

import pytest

from easytrain import ArgumentError
from easytrain.config_io import parse_task_arguments, peek_task
from easytrain.tasks.registry import resolve_task
from easytrain.trainers.dpo import DPOTrainer
from easytrain.trainers.dpo_arguments import DPOArguments
from easytrain.trainers.resume_checks import check_resumable, rerun_hint
from easytrain.trainers.sft import SFTArguments, SFTTrainer
from runs import args_for


class ModuleSFT(SFTTrainer):
    """An SFT subclass the CLI can import by its path (this test module is on the path)."""


def cli_config(output_dir):
    """What `easytrain train --config output_dir/arguments.json` parses: the task, its arguments, and the class."""
    argv = ["--config", str(output_dir / "arguments.json")]
    task = resolve_task(peek_task(argv))
    arguments, task_arguments = parse_task_arguments(argv, task.arguments, task.name)
    return arguments, task_arguments, task.target


def test_a_python_built_sft_trainer_records_task_sft_and_its_file_reruns(tmp_path):
    SFTTrainer(args_for(tmp_path / "run"), SFTArguments(packing=True, assistant_only_loss=True)).save_arguments()
    arguments, (sft,), target = cli_config(tmp_path / "run")
    assert arguments.task == "sft" and target is SFTTrainer
    assert sft.packing and sft.assistant_only_loss


def test_a_python_built_dpo_trainer_records_task_dpo_and_its_file_reruns(tmp_path):
    DPOTrainer(args_for(tmp_path / "run"), DPOArguments(beta=0.25, loss_type="ipo")).save_arguments()
    arguments, (dpo,), target = cli_config(tmp_path / "run")
    assert arguments.task == "dpo" and target is DPOTrainer
    assert (dpo.beta, dpo.loss_type) == (0.25, ["ipo"])


def test_a_task_the_arguments_name_for_the_running_class_is_kept(tmp_path):
    SFTTrainer(args_for(tmp_path / "run", task="sft")).save_arguments()
    assert json.loads((tmp_path / "run" / "arguments.json").read_text())["task"] == "sft"


def test_an_importable_subclass_records_its_path_and_the_cli_rebuilds_it(tmp_path):
    ModuleSFT(args_for(tmp_path / "run"), SFTArguments(packing=True)).save_arguments()
    arguments, (sft,), target = cli_config(tmp_path / "run")
    assert arguments.task == f"{__name__}:ModuleSFT" and target is ModuleSFT and sft.packing


def test_a_subclass_the_cli_cannot_import_records_its_registered_base_with_a_note(tmp_path, caplog):
    class LocalSFT(SFTTrainer):
        pass

    with caplog.at_level(logging.INFO, logger="easytrain"):
        LocalSFT(args_for(tmp_path / "run"), SFTArguments(packing=True)).save_arguments()
    arguments, (sft,), target = cli_config(tmp_path / "run")
    assert arguments.task == "sft" and target is SFTTrainer and sft.packing
    assert "LocalSFT" in caplog.text and "SFTTrainer" in caplog.text


LAUNCH = dict(coordinator_address="10.0.0.1:1234", num_processes=2)


def test_launch_fields_are_not_listed_as_changed_arguments():
    stored = {"seed": 0, **LAUNCH, "process_id": 0}
    now = {"seed": 1, **LAUNCH, "coordinator_address": "10.0.0.1:5678", "process_id": 1}
    hint = rerun_hint(stored, now)
    assert "seed" in hint
    assert not any(name in hint for name in ("coordinator_address", "num_processes", "process_id"))


def test_a_refused_resume_on_process_1_names_only_the_real_change():
    base = dict(seed=0, train_batch_size=4, tokenizer_name=None, model_name_or_path=None, **LAUNCH)
    stored = {"format_version": 1, "arguments": {**base, "process_id": 0}, "model_config": None}
    now = {"format_version": 1, "arguments": {**base, "train_batch_size": 8, "process_id": 1,
                                              "coordinator_address": "10.0.0.1:5678"}, "model_config": None}
    with pytest.raises(ArgumentError) as refused:
        check_resumable(stored, now)
    assert "train_batch_size" in str(refused.value)
    assert "process_id" not in str(refused.value) and "coordinator_address" not in str(refused.value)


def test_a_checkpoint_recording_the_default_task_is_not_listed_as_changed():
    """Before the running trainer's task was recorded, a Python-built SFTTrainer's checkpoints said 'lm': a refusal
    of their resume for another reason must not list `task: 'lm' vs 'sft'`, a change the user never made."""
    from easytrain.trainers.resume_checks import rerun_hint

    assert rerun_hint({"task": "lm", "seed": 1}, {"task": "sft", "seed": 1}) == ""
    assert "task: checkpoint 'dpo' vs now 'sft'" in rerun_hint({"task": "dpo"}, {"task": "sft"})
