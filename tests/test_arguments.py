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
    args = parse_arguments(["--learning_rate", "1e-3", "--optimizer", "lion", "--report_to", "jsonl", "csv",
                            "--no_async_checkpointing", "--max_steps", "7"])
    assert args.learning_rate == 1e-3 and args.optimizer == "lion" and args.max_steps == 7
    assert args.report_to == ["jsonl", "csv"] and args.async_checkpointing is False


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
    with pytest.raises(ArgumentError, match="report_to.*combines 'none' with other sinks"):
        TrainingArguments(report_to=["none", "jsonl"])  # refused with the arguments, not after the data is prepared
    with pytest.raises(SystemExit):  # argparse rejects an invalid choice before the dataclass exists
        parse_arguments(["--optimizer", "adamx"])


def test_arguments_reference_is_up_to_date():
    from pathlib import Path

    from easytrain.reference import render_markdown

    committed = (Path(__file__).resolve().parents[1] / "docs" / "arguments.md").read_text()
    assert committed == render_markdown(), "regenerate: python -m easytrain.reference > docs/arguments.md"


def test_every_row_of_the_arguments_reference_has_four_cells():
    """A `|` left unescaped in a type (`str | None`) or a description splits a row into one cell too many."""
    import re

    from easytrain.reference import render_markdown

    rows = [line for line in render_markdown().splitlines() if line.startswith("| `")]
    assert len(rows) > 50
    for row in rows:
        assert len(re.split(r"(?<!\\)\|", row)) == 6, row


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


# --- argument checks (audit: out-of-range values, types, strings for lists, YAML booleans, unused settings) -------
NAN = float("nan")


@pytest.mark.parametrize("values, field, expected", [
    ({"adam_beta1": 1.5}, "adam_beta1", r"\[0, 1\)"),
    ({"adam_beta1": NAN}, "adam_beta1", r"finite"),
    ({"adam_beta2": 2.0}, "adam_beta2", r"\[0, 1\)"),
    ({"adam_beta2": -0.1}, "adam_beta2", r"\[0, 1\)"),
    ({"adam_epsilon": -1.0}, "adam_epsilon", r"positive"),
    ({"adam_epsilon": 0.0}, "adam_epsilon", r"positive"),
    ({"sgd_momentum": -3.0}, "sgd_momentum", r"\[0, 1\)"),
    ({"sgd_momentum": 1.0}, "sgd_momentum", r"\[0, 1\)"),
    ({"num_processes": 0}, "num_processes", r"positive"),
    ({"num_processes": 2, "process_id": 5}, "process_id", r"\[0, 2\)"),
    ({"process_id": -1}, "process_id", r">= 0"),
    ({"max_train_samples": 0}, "max_train_samples", r"positive.*unset"),
    ({"max_train_samples": -1}, "max_train_samples", r"positive.*unset"),
    ({"max_eval_samples": -1}, "max_eval_samples", r"positive.*unset"),
    ({"preprocessing_num_workers": -2}, "preprocessing_num_workers", r"positive.*unset"),
    ({"preprocessing_num_workers": 0}, "preprocessing_num_workers", r"positive.*unset"),
    ({"seed": -1}, "seed", r">= 0"),
    ({"weight_decay": NAN}, "weight_decay", r"finite"),
    ({"lora_alpha": float("inf")}, "lora_alpha", r"finite"),
])
def test_out_of_range_values_name_the_field_and_the_range(values, field, expected):
    with pytest.raises(ArgumentError, match=expected) as caught:
        TrainingArguments(**values)
    assert caught.value.field == field


def test_boundary_values_are_accepted():
    TrainingArguments(adam_beta1=0.0, adam_beta2=0.0, sgd_momentum=0.0, adam_epsilon=1e-30, max_train_samples=1,
                      max_eval_samples=1, preprocessing_num_workers=1, num_processes=1, process_id=0, seed=0)


@pytest.mark.parametrize("field, value, expected", [
    ("learning_rate", "1e-3", r"a number.*got '1e-3' \(str\).*learning_rate=0.001"),
    ("max_steps", "3", r"an integer.*got '3' \(str\).*max_steps=3"),
    ("max_steps", 6.5, r"an integer.*got 6.5 \(float\)"),
    ("train_batch_size", 16.0, r"an integer.*got 16.0 \(float\)"),
    ("warmup_steps", 2.5, r"an integer"),
    ("seed", None, r"an integer.*got None"),
    ("seed", True, r"an integer.*got True \(bool\)"),
    ("logging_steps", True, r"an integer"),
    ("output_dir", None, r"a string.*got None"),
    ("text_column", 3, r"a string"),
    ("save_pretrained_at_end", "false", r"True or False"),
    ("max_train_samples", 2.0, r"an integer or None"),
    ("report_to", ["jsonl", 3], r"strings"),
])
def test_wrong_python_types_name_the_field(field, value, expected):
    with pytest.raises(ArgumentError, match=expected) as caught:
        TrainingArguments(**{field: value})
    assert caught.value.field == field


def test_float_fields_accept_ints():
    assert TrainingArguments(learning_rate=1, warmup_ratio=0, max_grad_norm=2).learning_rate == 1


@pytest.mark.parametrize("text, field", [("max_steps: 6.5\n", "max_steps"), ("seed: true\n", "seed"),
                                         ("train_batch_size: 16.0\n", "train_batch_size")])
def test_config_file_values_are_type_checked(tmp_path, text, field):
    path = tmp_path / "config.yaml"
    path.write_text(text)
    with pytest.raises(ArgumentError) as caught:
        parse_arguments(["--config", str(path)])
    assert caught.value.field == field


def test_a_single_string_is_a_one_element_list(tmp_path):
    assert TrainingArguments(report_to="jsonl").report_to == ["jsonl"]
    assert TrainingArguments(eval_metrics="accuracy").eval_metrics == ["accuracy"]
    assert TrainingArguments(report_to=("jsonl", "csv")).report_to == ["jsonl", "csv"]
    (tmp_path / "a.yaml").write_text("eval_metrics: accuracy\n")
    assert parse_arguments(["--config", str(tmp_path / "a.yaml")]).eval_metrics == ["accuracy"]
    (tmp_path / "b.json").write_text('{"report_to": "jsonl"}')
    assert parse_arguments(["--config", str(tmp_path / "b.json")]).report_to == ["jsonl"]
    # lora_target_modules keeps PEFT's meaning of a plain string (one regular expression)
    assert TrainingArguments(lora_rank=4, lora_target_modules="q_proj").lora_target_modules == "q_proj"


def test_yaml_unquoted_no_means_no_for_strategies(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("save_strategy: no\neval_strategy: no\n")
    args = parse_arguments(["--config", str(path)])
    assert args.eval_strategy == "no" and args.save_strategy == "no"
    path.write_text("eval_strategy: yes\n")
    with pytest.raises(ArgumentError, match="eval_strategy.*quote") as caught:
        parse_arguments(["--config", str(path)])
    assert caught.value.field == "eval_strategy"


def test_validation_file_without_train_file_is_refused():
    with pytest.raises(ArgumentError, match="train_file") as caught:
        TrainingArguments(validation_file="valid.jsonl")
    assert caught.value.field == "validation_file"
    TrainingArguments(train_file="train.jsonl", validation_file="valid.jsonl")


def test_early_stopping_without_evaluation_is_refused():
    with pytest.raises(ArgumentError, match="eval_strategy") as caught:
        parse_arguments(["--early_stopping_patience", "2", "--eval_strategy", "no"])
    assert caught.value.field == "early_stopping_patience"
    TrainingArguments(early_stopping_patience=2, eval_strategy="epoch")


def test_empty_training_set_names_real_fields():
    from easytrain.data.errors import DataError
    from easytrain.data.loader import TrainBatches

    with pytest.raises(DataError, match="has 0 rows.*train_batch_size.*max_train_samples") as caught:
        TrainBatches({"input_ids": __import__("numpy").zeros((0, 4), "int32")}, 16, seed=0)
    assert "global_batch_size" not in str(caught.value)


@pytest.mark.parametrize("sizes, field", [({"data": -1, "fsdp": 16, "tensor": 1}, "fsdp_size"),
                                          ({"data": -1, "fsdp": 1, "tensor": 3}, "tensor_parallel_size"),
                                          ({"data": 1, "fsdp": -1, "tensor": -1}, "tensor_parallel_size")])
def test_mesh_size_errors_name_real_fields(sizes, field):
    from easytrain.sharding import resolve_mesh_shape

    with pytest.raises(ArgumentError) as caught:
        resolve_mesh_shape(sizes, 8)
    assert caught.value.field == field
    assert "data_size" not in str(caught.value) and "tensor_size" not in str(caught.value)


def test_an_optional_number_with_a_default_can_be_unset_on_the_command_line():
    """`save_total_limit` defaults to 3; `none` keeps every checkpoint, as `null` does in a config file."""
    assert parse_arguments(["--save_total_limit", "none"]).save_total_limit is None
    assert parse_arguments(["--save_total_limit", "null"]).save_total_limit is None
    assert parse_arguments(["--save_total_limit", "5"]).save_total_limit == 5
    with pytest.raises(SystemExit):
        parse_arguments(["--save_total_limit", "five"])


def test_the_help_of_a_no_flag_says_what_it_turns_off():
    from easytrain.config_io import build_parser

    helps = {option: action.help for action in build_parser()._actions for option in action.option_strings}
    assert helps["--no_save_pretrained_at_end"].startswith("Turn off --save_pretrained_at_end")
    assert "default: False" not in build_parser().format_help().split("--no_save_pretrained_at_end")[1][:300]
