"""Errors a newcomer meets first: a flag of another task, a misspelt task, a file as output_dir, PEFT's
comma-separated LoRA targets, and `--disable_progress_bar` quieting the data preparation's progress bars."""

import logging
import sys

import datasets
import numpy as np
import pytest

from easytrain import TrainingArguments
from easytrain.cli import main
from easytrain.errors import OutputDirError
from easytrain.lora_config import targets_from_arguments
from easytrain.tasks import arithmetic
from easytrain.trainers import BaseTrainer
from easytrain.trainers import builders
from easytrain.trainers.run_dir import check_writable


def test_a_flag_of_another_task_names_that_task(capsys):
    assert main(["train", "--train_file", "corpus.txt", "--packing"]) == 2
    err = capsys.readouterr().err
    assert "--packing is an argument of task 'sft', not of task 'lm'" in err and "add --task sft" in err, err


def test_a_dpo_flag_under_task_sft_names_dpo(capsys):
    assert main(["train", "--task", "sft", "--beta", "0.1"]) == 2
    assert "--beta is an argument of task 'dpo', not of task 'sft'; add --task dpo" in capsys.readouterr().err


def test_a_config_key_of_another_task_names_that_task(tmp_path, capsys):
    config = tmp_path / "wrongtask.yaml"
    config.write_text("beta: 0.1\n")
    assert main(["train", "--config", str(config)]) == 2
    err = capsys.readouterr().err
    assert "beta: an argument of task 'dpo', not of task 'lm'" in err and "task: dpo" in err, err


def test_a_typo_of_this_task_still_gets_did_you_mean(capsys):
    assert main(["train", "--task", "sft", "--pakcing"]) == 2
    assert "Did you mean --packing?" in capsys.readouterr().err


def test_a_misspelt_task_gets_did_you_mean(capsys):
    assert main(["train", "--task", "stf"]) == 2
    err = capsys.readouterr().err
    assert "unknown task 'stf'; available: " in err and err.rstrip().endswith("Did you mean 'sft'?"), err


def test_output_dir_that_is_a_file_says_so(tmp_path):
    afile = tmp_path / "afile"
    afile.write_text("")
    with pytest.raises(OutputDirError, match=r"'.*afile' is a file, not a directory; .*--output_dir"):
        check_writable(afile)
    with pytest.raises(OutputDirError, match=r"'.*afile' is a file, not a directory"):
        check_writable(afile / "run")


@pytest.mark.parametrize("given, names", [
    (["q_proj,v_proj"], ["q_proj", "v_proj"]),
    (["q_proj,", "v_proj"], ["q_proj", "v_proj"]),
    (["q_proj", "v_proj"], ["q_proj", "v_proj"]),
])
def test_lora_targets_accept_peft_commas(given, names):
    assert list(targets_from_arguments(given)) == names


def test_lora_regex_keeps_its_commas():
    assert targets_from_arguments([r"re:.*\.(q|v)_proj{1,2}"]) == r".*\.(q|v)_proj{1,2}"


class _Trainer:
    """Enough of a trainer for `prepared_rows`: records whether datasets' progress bars were off."""

    def __init__(self, disable: bool):
        self.arguments = TrainingArguments(disable_progress_bar=disable, train_batch_size=4, max_steps=1)
        self.reads_given_data = True
        self.bars_off = None

    def prepare_datasets(self):
        self.bars_off = datasets.utils.are_progress_bars_disabled()
        return {"input_ids": np.zeros((8, 4), np.int32)}, None


@pytest.mark.parametrize("disable", [True, False])
def test_disable_progress_bar_quiets_data_preparation_only(disable, monkeypatch):
    monkeypatch.setattr(sys.modules["datasets.utils.tqdm"], "_hf_datasets_progress_bars_disabled", False)
    trainer = _Trainer(disable)
    builders.prepared_rows(trainer)
    assert trainer.bars_off is disable
    assert datasets.utils.are_progress_bars_disabled() is False  # restored for the rest of the process


def _epoch_warnings(caplog):
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING and "epoch" in r.getMessage()]


def test_the_embedded_demo_does_not_warn_about_its_own_rows(tmp_path, caplog):
    """`easytrain train` with no data: 620 blocks, 16 per batch. The demo's data was not the user's choice, so the
    rows-left-out warning (for the user's own data) would be a newcomer's first warning about nothing to fix."""
    args = TrainingArguments(output_dir=str(tmp_path), report_to=["none"], disable_progress_bar=True)
    with caplog.at_level(logging.WARNING, logger="easytrain"):
        data = BaseTrainer(args).configure_dataloaders()
    assert data.steps_per_epoch == 38  # 620 // 16: the demo's data and order are unchanged
    assert not _epoch_warnings(caplog), _epoch_warnings(caplog)


def test_own_rows_the_batch_does_not_divide_still_warn(tmp_path, caplog):
    rows = datasets.Dataset.from_dict({"text": [f"{i}+{i}={2 * i:03d}" for i in range(400)]})
    args = TrainingArguments(output_dir=str(tmp_path), report_to=["none"], disable_progress_bar=True,
                             max_length=16, train_batch_size=16, validation_split_percentage=0)
    with caplog.at_level(logging.WARNING, logger="easytrain"):
        BaseTrainer(args, dataset_train=rows, tokenizer=arithmetic.build_arithmetic_tokenizer()).configure_dataloaders()
    assert len(_epoch_warnings(caplog)) == 1, caplog.text
