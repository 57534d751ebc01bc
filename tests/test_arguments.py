import dataclasses
import json

import pytest
import yaml

from easytrain import ArgumentError, TrainingArguments, load_arguments, parse_arguments, save_arguments
from easytrain.arguments import field_names
from easytrain.config_io import build_parser


def test_defaults_are_valid_and_every_field_has_help():
    TrainingArguments()
    for f in dataclasses.fields(TrainingArguments):
        assert f.metadata.get("help"), f"{f.name} has no help text"


def test_help_lists_every_argument():
    text = build_parser().format_help()
    for name in field_names():
        assert f"--{name}" in text
    assert "--config" in text


def test_command_line_parsing():
    args = parse_arguments(["--learning_rate", "1e-3", "--optimizer", "lion", "--report_to", "jsonl", "none",
                            "--no_async_checkpointing", "--max_steps", "7"])
    assert args.learning_rate == 1e-3 and args.optimizer == "lion" and args.max_steps == 7
    assert args.report_to == ["jsonl", "none"] and args.async_checkpointing is False


@pytest.mark.parametrize("suffix", [".yaml", ".json"])
def test_config_file_with_command_line_overrides(tmp_path, suffix):
    values = {"learning_rate": 0.01, "train_batch_size": 8, "report_to": ["jsonl"], "seed": 3}
    path = tmp_path / f"config{suffix}"
    path.write_text(yaml.safe_dump(values) if suffix == ".yaml" else json.dumps(values))
    args = parse_arguments(["--config", str(path), "--seed", "5"])
    assert args.learning_rate == 0.01 and args.train_batch_size == 8 and args.report_to == ["jsonl"]
    assert args.seed == 5  # the command line wins over the file


def test_json_round_trip_is_identical(tmp_path):
    args = parse_arguments(["--learning_rate", "2e-4", "--max_train_samples", "10", "--report_to", "none"])
    save_arguments(args, tmp_path)
    assert load_arguments(tmp_path) == args
    assert TrainingArguments.from_dict(json.loads(args.to_json())) == args


def test_yaml_round_trip_through_cli(tmp_path):
    from easytrain.config_io import to_yaml

    args = TrainingArguments(learning_rate=5e-4, optimizer="sgd", warmup_steps=3)
    path = tmp_path / "args.yaml"
    path.write_text(to_yaml(args))
    assert parse_arguments(["--config", str(path)]) == args


def test_unknown_command_line_argument_suggests_the_fix():
    with pytest.raises(ArgumentError, match="Did you mean --learning_rate"):
        parse_arguments(["--learnig_rate", "0.1"])


def test_unknown_config_key_is_named(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("train_batchsize: 4\n")
    with pytest.raises(ArgumentError, match="train_batchsize.*Did you mean 'train_batch_size'"):
        parse_arguments(["--config", str(path)])


def test_missing_config_file():
    with pytest.raises(ArgumentError, match="config"):
        parse_arguments(["--config", "/does/not/exist.yaml"])


@pytest.mark.parametrize("field, value", [("train_batch_size", 0), ("train_batch_size", -4),
                                          ("eval_batch_size", 0), ("learning_rate", 0.0),
                                          ("learning_rate", -1e-3), ("max_length", 0), ("logging_steps", 0)])
def test_non_positive_values_name_the_field(field, value):
    with pytest.raises(ArgumentError, match=field):
        TrainingArguments(**{field: value})


def test_accumulation_must_divide_batch():
    with pytest.raises(ArgumentError, match="gradient_accumulation_steps.*1, 2, 3, 4, 6, 12"):
        TrainingArguments(train_batch_size=12, gradient_accumulation_steps=5)


def test_bad_choice_and_sink():
    with pytest.raises(ArgumentError, match="report_to"):
        TrainingArguments(report_to=["wandbx"])
    with pytest.raises(SystemExit):  # argparse rejects an invalid choice before the dataclass exists
        parse_arguments(["--optimizer", "adamx"])


def test_arguments_reference_is_up_to_date():
    from pathlib import Path

    from easytrain.reference import render_markdown

    committed = (Path(__file__).resolve().parents[1] / "docs" / "arguments.md").read_text()
    assert committed == render_markdown(), "regenerate: python -m easytrain.reference > docs/arguments.md"


@pytest.mark.parametrize("field", ["dtype", "param_dtype"])
def test_float16_is_refused_for_want_of_loss_scaling(field):
    with pytest.raises(ArgumentError, match="float16.*loss scaling.*bfloat16") as caught:
        TrainingArguments(**{field: "float16"})
    assert caught.value.field == field
    TrainingArguments(**{field: "bfloat16"})


@pytest.mark.parametrize("field", ["dtype", "param_dtype"])
def test_float16_on_the_command_line_gets_the_same_message_not_invalid_choice(field):
    with pytest.raises(ArgumentError, match="loss scaling.*bfloat16") as caught:
        parse_arguments([f"--{field}", "float16"])
    assert caught.value.field == field
