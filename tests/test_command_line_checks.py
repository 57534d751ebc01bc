"""Command-line values of a task's own dataclasses get the checks a `--config` file's get (a NaN `beta` trained
nothing and exited 0; `--logps_chunk_size 0` died in the first step), refused with exit 2 before any work; every
Optional field can be unset on the command line with `none` / `null`, as `null` does in a config file; YAML's
`1e-1` (a string to YAML 1.1) is read as a number in a list as it is alone."""

from __future__ import annotations

import dataclasses

import pytest

from easytrain import compilation_cache
from easytrain.argument_checks import check_file_values
from easytrain.cli import main
from easytrain.config_io import parse_arguments, parse_task_arguments
from easytrain.errors import ArgumentError
from easytrain.trainers.dpo_arguments import DPOArguments
from easytrain.trainers.sft import SFTArguments

DPO_REFUSED = [
    (["--beta", "nan"], "beta"),
    (["--beta", "inf"], "beta"),
    (["--loss_type", "sigmoid", "sft", "--loss_weights", "1", "nan"], "loss_weights"),
    (["--loss_type", "sigmoid", "sft", "--loss_weights", "1", "-inf"], "loss_weights"),
    (["--loss_type", "simpo", "--simpo_gamma", "nan"], "simpo_gamma"),
    (["--loss_type", "simpo", "--simpo_gamma", "inf"], "simpo_gamma"),
    (["--label_smoothing", "nan"], "label_smoothing"),
    (["--logps_chunk_size", "0"], "logps_chunk_size"),
    (["--logps_chunk_size", "-8"], "logps_chunk_size"),
    (["--max_prompt_length", "0"], "max_prompt_length"),
    (["--sync_ref_model", "--ref_model_sync_steps", "0"], "ref_model_sync_steps"),
    (["--sync_ref_model", "--ref_model_mixup_alpha", "nan"], "ref_model_mixup_alpha"),
]


@pytest.mark.parametrize(("argv", "field"), DPO_REFUSED, ids=lambda v: " ".join(v) if isinstance(v, list) else v)
def test_a_meaningless_dpo_flag_is_refused_naming_its_field(argv, field) -> None:
    with pytest.raises(ArgumentError) as refused:
        parse_task_arguments(argv, (DPOArguments,), "dpo")
    assert refused.value.field == field, refused.value


@pytest.mark.parametrize("values", [dict(beta=float("nan")), dict(beta=float("inf")),
                                    dict(loss_type=["sigmoid", "sft"], loss_weights=[1.0, float("nan")]),
                                    dict(loss_type="simpo", simpo_gamma=float("-inf")), dict(logps_chunk_size=0)])
def test_the_same_values_are_refused_from_python(values) -> None:
    with pytest.raises(ArgumentError) as refused:
        DPOArguments(**values)
    assert refused.value.field in values


def test_a_nan_beta_exits_2_before_any_work(tmp_path, capsys) -> None:
    run = tmp_path / "run"
    assert main(["train", "--task", "dpo", "--output_dir", str(run), "--max_steps", "2", "--beta", "nan"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("easytrain: error: beta:") and "finite" in err and "Traceback" not in err, err
    assert not run.exists()


def test_sync_steps_below_one_names_sync_steps_and_the_fix() -> None:
    with pytest.raises(ArgumentError, match=r"^ref_model_sync_steps: .*>= 1") as refused:
        DPOArguments(sync_ref_model=True, ref_model_sync_steps=0)
    assert "ref_model_mixup_alpha" not in refused.value.message


def test_sensible_dpo_flags_still_parse() -> None:
    _, (dpo,) = parse_task_arguments(["--beta", "0.5", "--loss_type", "sigmoid", "sft", "--loss_weights", "1", "0.5",
                                      "--logps_chunk_size", "1", "--max_prompt_length", "8"], (DPOArguments,), "dpo")
    assert (dpo.beta, dpo.loss_weights, dpo.logps_chunk_size, dpo.max_prompt_length) == (0.5, [1.0, 0.5], 1, 8)


@pytest.mark.parametrize(("argv", "field"), [(["--max_new_tokens", "0"], "max_new_tokens"),
                                             (["--generation_eval_samples", "-1"], "generation_eval_samples")])
def test_an_sft_flag_out_of_range_names_its_own_field(argv, field) -> None:
    with pytest.raises(ArgumentError) as refused:
        parse_task_arguments(argv, (SFTArguments,), "sft")
    assert refused.value.field == field, refused.value


@dataclasses.dataclass
class CustomArguments:
    """A task's own options, as a user writes them (a loose annotation on a default left alone)."""

    temperature: float = 1.0
    note: str = None  # type: ignore[assignment]


def test_a_custom_tasks_flags_are_type_checked_and_its_defaults_left_alone() -> None:
    _, (custom,) = parse_task_arguments([], (CustomArguments,), "custom")
    assert custom.temperature == 1.0 and custom.note is None
    with pytest.raises(ArgumentError, match=r"^temperature: must be a finite number"):
        parse_task_arguments(["--temperature", "nan"], (CustomArguments,), "custom")


def test_a_nan_in_a_config_files_list_is_refused(tmp_path) -> None:
    path = tmp_path / "run.yaml"
    path.write_text("task: dpo\nloss_type: [sigmoid, sft]\nloss_weights: [1, .nan]\n")
    with pytest.raises(ArgumentError, match=r"^loss_weights: .*finite"):
        parse_task_arguments(["--config", str(path)], (DPOArguments,), "dpo")


# ----------------------------------------------------------------------------- none / null on the command line

CONFIG = ("max_train_samples: 100\nearly_stopping_patience: 2\nmetric_for_best_model: eval_loss\n"
          "greater_is_better: false\nsave_total_limit: 2\ntokenizer_name: tok\nmodel_name_or_path: some/model\n")


@pytest.mark.parametrize("field", ["max_train_samples", "early_stopping_patience", "metric_for_best_model",
                                   "save_total_limit", "tokenizer_name", "model_name_or_path", "greater_is_better"])
@pytest.mark.parametrize("spelling", ["none", "null", "None"])
def test_an_optional_field_set_in_a_config_file_is_unset_on_the_command_line(tmp_path, field, spelling) -> None:
    path = tmp_path / "run.yaml"
    path.write_text(CONFIG)
    args = parse_arguments(["--config", str(path), f"--{field}", spelling, "--output_dir", str(tmp_path)])
    if field == "greater_is_better":  # unset: inferred from the metric's name again
        assert args.greater_is_better is False and args.to_dict() and not _given_direction(args)
    else:
        assert getattr(args, field) is None


def _given_direction(args) -> bool:
    from easytrain.best_metric_direction import direction_inferred

    return not direction_inferred(args)


def test_a_task_optional_field_is_unset_on_the_command_line(tmp_path) -> None:
    path = tmp_path / "run.yaml"
    path.write_text("task: dpo\nmax_prompt_length: 16\nref_model_name_or_path: some/model\n")
    _, (dpo,) = parse_task_arguments(["--config", str(path), "--max_prompt_length", "null",
                                      "--ref_model_name_or_path", "none"], (DPOArguments,), "dpo")
    assert dpo.max_prompt_length is None and dpo.ref_model_name_or_path is None


def test_none_keeps_its_meaning_for_list_fields() -> None:
    args = parse_arguments(["--eval_metrics", "none", "--report_to", "none"])
    assert args.eval_metrics == [] and args.report_to == ["none"]


def test_a_compilation_cache_dir_of_null_is_jaxs_own_setting(tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    for spelling in ("null", "none", "NULL"):
        assert parse_arguments(["--compilation_cache_dir", spelling]).compilation_cache_dir is None
        assert compilation_cache.resolve(spelling) is None  # a file's quoted "null" too
    assert not (tmp_path / "null").exists()


# ----------------------------------------------------------------------------- YAML 1.1 numbers in lists


def test_yaml_exponent_numbers_in_a_list_are_read_as_numbers(tmp_path) -> None:
    path = tmp_path / "run.yaml"
    path.write_text("task: dpo\nloss_type: [sigmoid, sft]\nloss_weights: [1e-1, 1]\n")
    _, (dpo,) = parse_task_arguments(["--config", str(path)], (DPOArguments,), "dpo")
    assert dpo.loss_weights == [0.1, 1]


@dataclasses.dataclass
class Lists:
    sizes: list[int] = dataclasses.field(default_factory=list)
    weights: list[float] = dataclasses.field(default_factory=list)


def test_list_items_that_are_not_numbers_are_still_refused() -> None:
    assert check_file_values({"sizes": ["3", 4], "weights": ["2E3", "1e-2"]}, (Lists,)) == {
        "sizes": [3, 4], "weights": [2000.0, 0.01]}
    with pytest.raises(ArgumentError, match=r"^sizes: must be a list of integers, got \['3', 'x'\]"):
        check_file_values({"sizes": ["3", "x"]}, (Lists,))
    with pytest.raises(ArgumentError, match=r"^weights: "):
        check_file_values({"weights": ["nan"]}, (Lists,))
