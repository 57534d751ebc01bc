"""Learning-rate schedule names of transformers that easytrain does not have are refused before any compute, naming
the easytrain setting that gives the same curve where one exists (docs/porting.md)."""

import pytest

from easytrain import ArgumentError, TrainingArguments
from easytrain.config_io import parse_arguments


@pytest.mark.parametrize("name, hint", [
    ("constant_with_warmup", "lr_scheduler_type='constant' with warmup_steps or warmup_ratio"),
    ("cosine_with_restarts", "lr_scheduler_type='cosine'"),
    ("polynomial", "lr_scheduler_type='linear'"),
    ("inverse_sqrt", "configure_schedule"),
    ("reduce_lr_on_plateau", "configure_schedule"),
    ("cosine_with_min_lr", "configure_schedule"),
    ("warmup_stable_decay", "configure_schedule"),
])
def test_transformers_schedule_names_are_refused_with_the_equivalent(tmp_path, name, hint):
    with pytest.raises(ArgumentError, match="lr_scheduler_type") as raised:
        TrainingArguments(output_dir=str(tmp_path), lr_scheduler_type=name)
    assert hint in str(raised.value) and "transformers" in str(raised.value), raised.value


def test_the_hint_reaches_a_config_file(tmp_path):
    config = tmp_path / "ported.yaml"
    config.write_text("lr_scheduler_type: constant_with_warmup\nwarmup_steps: 100\n")
    with pytest.raises(ArgumentError, match="lr_scheduler_type='constant' with warmup_steps"):
        parse_arguments(["--config", str(config), "--output_dir", str(tmp_path / "run")])


def test_an_unknown_name_still_lists_the_choices(tmp_path):
    with pytest.raises(ArgumentError, match="must be one of constant, linear, cosine; got 'cosin'") as raised:
        TrainingArguments(output_dir=str(tmp_path), lr_scheduler_type="cosin")
    assert "transformers" not in str(raised.value)


def test_on_the_command_line_the_hint_follows_argparse_s_choices(capsys):
    with pytest.raises(SystemExit) as exited:
        parse_arguments(["--lr_scheduler_type", "constant_with_warmup", "--output_dir", "unused"])
    error = capsys.readouterr().err
    assert exited.value.code == 2 and "invalid choice: 'constant_with_warmup'" in error
    assert "lr_scheduler_type='constant' with warmup_steps or warmup_ratio" in error, error
