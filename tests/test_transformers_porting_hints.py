"""A transformers.Trainer setting is refused naming its easytrain equivalent, not the name it reads closest to: on
the command line, in a YAML or JSON `--config` file and in `TrainingArguments.from_dict`. `--gradient_checkpointing`
reads closest to `--async_checkpointing`, `--eval_accumulation_steps` to `--gradient_accumulation_steps` (which
changes training), `--optim sgd` to `--optimizer sgd` (momentum 0.9 here, 0 there)."""

import json

import pytest

from easytrain import TrainingArguments
from easytrain.cli import main
from easytrain.argument_values import transformers_value_hint
from easytrain.errors import ArgumentError


def command_line_error(capsys, *argv: str) -> str:
    """What `easytrain train ARGV` prints on stderr, refused with exit code 2 (argparse's own refusals exit)."""
    try:
        code = main(["train", *argv])
    except SystemExit as exit:
        code = exit.code
    assert code == 2
    return capsys.readouterr().err


def config_error(tmp_path, capsys, values: dict, suffix: str = ".yaml") -> str:
    path = tmp_path / f"run{suffix}"
    path.write_text(json.dumps(values))  # JSON is YAML too
    return command_line_error(capsys, "--config", str(path))


@pytest.mark.parametrize("argv", [("--gradient_checkpointing", "true"), ("--gradient_checkpointing",),
                                  ("--activation_checkpointing=True",)])
def test_gradient_checkpointing_points_to_remat_policy_full(argv, capsys):
    err = command_line_error(capsys, *argv)
    assert "Did you mean --remat_policy full?" in err and "async_checkpointing" not in err, err


def test_gradient_checkpointing_false_is_the_default(tmp_path, capsys):
    err = config_error(tmp_path, capsys, {"gradient_checkpointing": False})
    assert "Did you mean 'remat_policy: none'?" in err and "default" in err, err


@pytest.mark.parametrize("suffix", [".yaml", ".json"])
def test_gradient_checkpointing_in_a_config_file(suffix, tmp_path, capsys):
    err = config_error(tmp_path, capsys, {"gradient_checkpointing": True}, suffix)
    assert "Did you mean 'remat_policy: full'?" in err and "async_checkpointing" not in err, err


def test_bf16_points_to_dtype_bfloat16(tmp_path, capsys):
    assert "Did you mean --dtype bfloat16?" in command_line_error(capsys, "--bf16", "true")
    assert "Did you mean 'dtype: bfloat16'?" in config_error(tmp_path, capsys, {"bf16": True})


def test_fp16_points_to_bfloat16_and_says_why(capsys):
    err = command_line_error(capsys, "--fp16", "true")
    assert "Did you mean --dtype bfloat16?" in err and "loss scaling" in err and "float16" in err, err


@pytest.mark.parametrize("argv", [("--warmup_steps", "0.1"), ("--warmup_steps=0.1",)])
def test_warmup_steps_ratio_points_to_warmup_ratio(argv, capsys):
    err = command_line_error(capsys, *argv)
    assert "invalid int value: '0.1'" in err and "warmup_ratio" in err and "0.1" in err, err


@pytest.mark.parametrize("suffix", [".yaml", ".json"])
def test_warmup_steps_ratio_in_a_config_file_points_to_warmup_ratio(suffix, tmp_path, capsys):
    err = config_error(tmp_path, capsys, {"warmup_steps": 0.1}, suffix)
    assert "warmup_steps:" in err and "warmup_ratio" in err, err


@pytest.mark.parametrize("values", [{"warmup_steps": 0.1}, {"num_train_epochs": 1.5}, {"optimizer": "adamw_torch"}])
def test_a_config_files_transformers_value_names_the_file_and_gives_the_hint_once(values, tmp_path, capsys):
    err = config_error(tmp_path, capsys, values)
    hint = transformers_value_hint(*next(iter(values.items())))
    assert str(tmp_path / "run.yaml") in err and err.count(hint.strip()) == 1, err


@pytest.mark.parametrize("flag", [["--learning_rate", "-1"], ["--learning-rate", "-1"], ["--learning-rate=-1"]])
def test_a_refused_command_line_value_is_not_blamed_on_the_config_file(flag, tmp_path, capsys):
    path = tmp_path / "run.yaml"
    path.write_text(json.dumps({"learning_rate": 0.001}))
    err = command_line_error(capsys, "--config", str(path), *flag)
    assert "learning_rate" in err and str(path) not in err, err


def test_fractional_epochs_point_to_max_steps(tmp_path, capsys):
    err = command_line_error(capsys, "--num_train_epochs", "1.5")
    assert "invalid int value: '1.5'" in err and "Epochs are whole" in err and "max_steps" in err, err
    err = config_error(tmp_path, capsys, {"num_train_epochs": 1.5})
    assert "num_train_epochs:" in err and "Epochs are whole" in err and "max_steps" in err, err


def test_eval_accumulation_steps_is_not_gradient_accumulation(tmp_path, capsys):
    for err in (command_line_error(capsys, "--eval_accumulation_steps", "2"),
                config_error(tmp_path, capsys, {"eval_accumulation_steps": 2})):
        assert "Did you mean" not in err and "no such setting" in err and "on the device" in err, err


@pytest.mark.parametrize("name", ["adamw_torch", "adamw_torch_fused"])
def test_a_transformers_optimizer_value_names_adamw(name, tmp_path, capsys):
    assert "optimizer='adamw'" in command_line_error(capsys, "--optimizer", name)
    assert "optimizer='adamw'" in config_error(tmp_path, capsys, {"optimizer": name})
    with pytest.raises(ArgumentError, match="optimizer='adamw'"):
        TrainingArguments(optimizer=name)


@pytest.mark.parametrize("value, expected", [
    ("adamw_torch", "Did you mean --optimizer adamw?"), ("adamw_torch_fused", "Did you mean --optimizer adamw?"),
    ("sgd", "Did you mean --optimizer sgd --sgd_momentum 0?"), ("adafactor", "Did you mean --optimizer adafactor?"),
])
def test_optim_names_the_optimizer_and_its_settings(value, expected, capsys):
    assert expected in (err := command_line_error(capsys, "--optim", value)), err


def test_optim_sgd_in_a_config_file_sets_momentum_0(tmp_path, capsys):
    err = config_error(tmp_path, capsys, {"optim": "sgd"})
    assert "Did you mean 'optimizer: sgd', 'sgd_momentum: 0'?" in err, err


def test_optim_adafactor_says_the_update_differs(capsys):
    err = command_line_error(capsys, "--optim", "adafactor")
    assert "scale_parameter" in err and "--optimizer's help" in err, err


def test_an_optimizer_easytrain_lacks_lists_the_choices(capsys):
    err = command_line_error(capsys, "--optim", "rmsprop")
    assert "Did you mean --optimizer?" in err and "adamw, adafactor, lion, sgd" in err, err


def test_data_seed_says_what_seed_seeds_besides(tmp_path, capsys):
    for err in (command_line_error(capsys, "--data_seed", "3"), config_error(tmp_path, capsys, {"data_seed": 3})):
        assert "seed" in err and "data order alone" in err and "held-out" in err, err


@pytest.mark.parametrize("values, expected", [
    ({"data_seed": 3}, "Did you mean 'seed'?"), ({"gradient_checkpointing": True}, "'remat_policy: full'"),
    ({"optim": "sgd"}, "'sgd_momentum: 0'"), ({"learning_rte": 1e-3}, "Did you mean 'learning_rate'?"),
])
def test_from_dict_names_the_easytrain_setting(values, expected):
    with pytest.raises(ArgumentError) as error:
        TrainingArguments.from_dict(values)
    assert expected in str(error.value) and "dataset_name" not in str(error.value), error.value


def test_a_misspelling_still_gets_the_closest_name(capsys):
    assert "Did you mean --learning_rate?" in command_line_error(capsys, "--learning_rte", "1e-3")


def test_porting_guide_lists_every_transformers_name_and_optimizer():
    from easytrain.suggestions import TRANSFORMERS_FIELDS, TRANSFORMERS_OPTIMIZERS

    with open("docs/porting.md", encoding="utf-8") as guide:
        text = guide.read()
    missing = [name for name in [*TRANSFORMERS_FIELDS, *TRANSFORMERS_OPTIMIZERS] if f"`{name}`" not in text]
    assert not missing, missing
