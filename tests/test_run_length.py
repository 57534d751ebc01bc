"""What decides a run's length: `num_train_epochs` given without `max_steps` trains that many epochs (as in
transformers, whose max_steps defaults to -1), `max_steps` given wins over `num_train_epochs` with a warning, and
neither trains the default 1500 updates. The rule is resolved into concrete values when the arguments are built,
so a saved arguments.json reruns the same length without a warning, checkpoints of earlier versions (which stored
max_steps 1500 and num_train_epochs 3) resume without a schedule change, and every process compares the same
values."""

import dataclasses
import json
import logging

import pytest

from easytrain import TrainingArguments
from easytrain.argument_values import warn_epochs_unused
from easytrain.config_io import parse_arguments, save_arguments
from easytrain.trainers.argument_agreement import compared_values
from easytrain.trainers.resume import check_resumable
from test_custom_module_errors import Classifier, blobs

QUIET = dict(train_batch_size=8, eval_strategy="no", save_strategy="no", report_to=["none"],
             disable_progress_bar=True, save_pretrained_at_end=False)


@pytest.fixture(autouse=True)
def fresh_warnings():
    """The warning is said once per process for the same values: each test sees its own."""
    warn_epochs_unused.cache_clear()


class Rows32(Classifier):
    def prepare_datasets(self):
        return blobs(32, 1), None  # 4 steps an epoch at batch 8


def total_steps(args: TrainingArguments) -> int:
    return Rows32(args).configure_dataloaders().total_steps


def length_warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING
            and ("max_steps" in r.getMessage() or "num_train_epochs" in r.getMessage())]


def build(tmp_path, **given) -> TrainingArguments:
    return TrainingArguments(output_dir=str(tmp_path / "run"), **QUIET, **given)


@pytest.mark.parametrize("epochs", [3, 2, 1])
def test_num_train_epochs_without_max_steps_decides_the_length(tmp_path, caplog, epochs):
    """3 included: the value transformers defaults to, written out in a ported config, once trained 1500 steps."""
    with caplog.at_level(logging.WARNING, logger="easytrain"):
        args = build(tmp_path, num_train_epochs=epochs)
    assert total_steps(args) == 4 * epochs
    assert (args.max_steps, args.num_train_epochs) == (-1, epochs)  # transformers' "not set"
    assert args.uses_epochs and not length_warnings(caplog), caplog.text


def test_neither_given_trains_the_default_1500_updates(tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="easytrain"):
        args = build(tmp_path)
    assert (args.max_steps, args.num_train_epochs) == (1500, 3)  # what earlier versions stored
    assert total_steps(args) == 1500 and not length_warnings(caplog), caplog.text


@pytest.mark.parametrize("max_steps", [1500, 5])
def test_max_steps_given_wins_over_num_train_epochs_with_a_warning(tmp_path, caplog, max_steps):
    with caplog.at_level(logging.WARNING, logger="easytrain"):
        args = build(tmp_path, max_steps=max_steps, num_train_epochs=2)
    assert total_steps(args) == max_steps
    (warned,) = length_warnings(caplog)
    assert f"num_train_epochs=2 has no effect: max_steps={max_steps}" in warned and "max_steps" in warned, warned


def test_max_steps_alone_is_not_warned_about(tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="easytrain"):
        args = build(tmp_path, max_steps=5)
    assert total_steps(args) == 5 and not length_warnings(caplog), caplog.text


def test_a_non_positive_max_steps_trains_num_train_epochs(tmp_path):
    """transformers' max_steps=-1 written out, and easytrain's earlier spelling max_steps=0, both mean epochs."""
    assert total_steps(build(tmp_path, max_steps=-1, num_train_epochs=2)) == 8
    assert total_steps(build(tmp_path, max_steps=0)) == 12  # num_train_epochs' own default: 3


@pytest.mark.parametrize("given", [{}, {"num_train_epochs": 2}, {"num_train_epochs": 3}, {"max_steps": 7},
                                   {"max_steps": -1, "num_train_epochs": 2}])
def test_saved_arguments_rerun_the_same_length_without_a_warning(tmp_path, caplog, given):
    """`easytrain train --config output_dir/arguments.json` (and `from_dict` of the saved values)."""
    args = build(tmp_path, **given)
    path = save_arguments(args, tmp_path / "saved")
    with caplog.at_level(logging.WARNING, logger="easytrain"):
        from_file = parse_arguments(["--config", str(path)])
        from_dict = TrainingArguments.from_dict(json.loads(path.read_text()))
    assert from_file == args and from_dict == args
    assert total_steps(from_file) == total_steps(args)
    assert not length_warnings(caplog), caplog.text


def test_command_line_num_train_epochs_alone_trains_epochs(tmp_path):
    args = parse_arguments(["--output_dir", str(tmp_path / "run"), "--num_train_epochs", "3", "--train_batch_size",
                            "8", "--eval_strategy", "no", "--save_strategy", "no", "--report_to", "none"])
    assert total_steps(args) == 12
    default = parse_arguments(["--output_dir", str(tmp_path / "run")])
    assert (default.max_steps, default.num_train_epochs) == (1500, 3)


def test_checkpoints_of_earlier_versions_resume_without_a_schedule_change(tmp_path, caplog):
    """Earlier versions stored max_steps 1500 and num_train_epochs 3 for the default job (and what was given for
    an epoch run, max_steps <= 0 among it): the same job now resolves to the same values."""
    for stored_length, given in (({"max_steps": 1500, "num_train_epochs": 3}, {}),
                                 ({"max_steps": 0, "num_train_epochs": 2}, {"max_steps": 0, "num_train_epochs": 2})):
        current = build(tmp_path, **given).to_dict()
        stored = {**current, **stored_length}
        with caplog.at_level(logging.WARNING, logger="easytrain"):
            check_resumable({"format_version": 1, "arguments": stored}, {"arguments": current})
        assert "schedule" not in caplog.text, caplog.text


def test_every_process_compares_the_resolved_length(tmp_path):
    """Processes given the same length in other spellings agree; a process training epochs and one training the
    default 1500 steps do not (their runs would differ)."""
    python = compared_values(build(tmp_path, num_train_epochs=3))
    command_line = compared_values(parse_arguments([
        "--output_dir", str(tmp_path / "run"), "--num_train_epochs", "3", "--train_batch_size", "8",
        "--eval_strategy", "no", "--save_strategy", "no", "--report_to", "none", "--disable_progress_bar",
        "--no_save_pretrained_at_end"]))
    assert python == command_line
    assert python != compared_values(build(tmp_path))


def test_replace_keeps_the_resolved_length(tmp_path):
    """`dataclasses.replace` (as `rerun_arguments` does for arguments.json) rebuilds from the resolved values."""
    args = build(tmp_path, num_train_epochs=2)
    assert total_steps(dataclasses.replace(args, seed=1)) == 8


def test_help_states_the_rule():
    helps = {f.name: f.metadata["help"] for f in dataclasses.fields(TrainingArguments)}
    assert "1500" in helps["max_steps"] and "num_train_epochs" in helps["max_steps"]
    assert "max_steps" in helps["num_train_epochs"] and "warn" in helps["max_steps"]
