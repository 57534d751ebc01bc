"""A sweep of bad inputs over every argument dataclass: each field given a value of another type, an empty string
where a path or name is expected, or a choice that does not exist is refused as `ArgumentError` naming that field,
when the dataclass is built (before any data, model or compile). A value accepted there would train something else
than asked: `packing='no'` packs, `train_file=''` trains the embedded arithmetic task, `init_weights_from=''` starts
from random weights. Trainer-level refusals (data, tokenizer, checkpoint paths) are in test_bad_input_sweep_trainer.py.
"""

from __future__ import annotations

import dataclasses
import typing
from typing import Any, Literal

import pytest

from easytrain.argument_checks import _split_optional
from easytrain.arguments import TrainingArguments
from easytrain.errors import ArgumentError
from easytrain.trainers.dpo_arguments import DPOArguments
from easytrain.trainers.sft import SFTArguments

CLASSES = (TrainingArguments, SFTArguments, DPOArguments)
#: Fields whose empty string has a documented meaning: XLA's own options, JAX's own cache, no stop file, no resume.
EMPTY_MEANS_SOMETHING = {"compiler_options", "compilation_cache_dir", "stop_file", "resume_from_checkpoint"}


def _wrong_type(hint: Any) -> Any:
    """A value of another type than `hint` that a config file or a Python caller plausibly writes."""
    hint, _ = _split_optional(hint)
    if hint is bool:
        return "no"  # a string: truthy, so it would switch the option on
    if hint is int:
        return 2.5
    if hint is float:
        return "1e-3"
    if hint is str:
        return 3
    if typing.get_origin(hint) is list:
        return [1.5] if typing.get_args(hint) == (str,) else ["x"]
    if typing.get_origin(hint) is Literal:
        return "no-such-choice"
    raise AssertionError(f"no wrong value for {hint}")


def _cases(kind: str) -> list[tuple[type, str, Any]]:
    cases = []
    for cls in CLASSES:
        hints = typing.get_type_hints(cls)
        for field in dataclasses.fields(cls):
            hint, _ = _split_optional(hints[field.name])
            if kind == "type":
                cases.append((cls, field.name, _wrong_type(hints[field.name])))
            elif (hint is str or field.name == "lora_target_modules") and field.name not in EMPTY_MEANS_SOMETHING:
                cases.extend((cls, field.name, blank) for blank in ("", "  "))
    return cases


def _build(cls: type, name: str, value: Any) -> Any:
    others = {"output_dir": "unused", "report_to": ["jsonl"]} if cls is TrainingArguments else {}
    return cls(**{**others, name: value})


@pytest.mark.parametrize("cls,name,value", _cases("type"), ids=lambda v: getattr(v, "__name__", repr(v)))
def test_a_value_of_another_type_is_refused_naming_its_field(cls, name, value):
    with pytest.raises(ArgumentError) as error:
        _build(cls, name, value)
    assert error.value.field == name, error.value
    assert repr(value) in error.value.message or "must be" in error.value.message


@pytest.mark.parametrize("cls,name,value", _cases("blank"), ids=lambda v: getattr(v, "__name__", repr(v)))
def test_an_empty_path_or_name_is_refused_not_read_as_unset(cls, name, value):
    with pytest.raises(ArgumentError, match="empty") as error:
        _build(cls, name, value)
    assert error.value.field == name
    assert "unset" in error.value.message or "give" in error.value.message
    assert "MISSING" not in error.value.message  # a list field's default comes from its factory


def test_the_sweep_covers_every_field():
    """A field added later is swept too: each has a wrong-type case."""
    swept = {(cls, name) for cls, name, _ in _cases("type")}
    assert swept == {(cls, f.name) for cls in CLASSES for f in dataclasses.fields(cls)}
    assert len(_cases("blank")) >= 2 * 14


@pytest.mark.parametrize("name,value", [("packing_strategy", "BFD"), ("truncation_side", "middle")])
def test_an_sft_choice_is_refused_by_its_own_name_with_the_choices(name, value):
    """Refused when `SFTArguments` is built, by its name (the data code named the packing strategy `strategy`)."""
    with pytest.raises(ArgumentError) as error:
        SFTArguments(**{name: value})
    assert error.value.field == name
    assert all(repr(choice) in error.value.message
               for choice in typing.get_args(typing.get_type_hints(SFTArguments)[name]))


@pytest.mark.parametrize("name", ["generation_eval_samples", "max_new_tokens"])
def test_an_sft_count_of_none_is_refused_by_name_not_as_a_type_error(name):
    with pytest.raises(ArgumentError, match="got None") as error:
        SFTArguments(**{name: None})
    assert error.value.field == name


def test_good_values_still_build():
    assert SFTArguments(packing=True, packing_strategy="wrapped", truncation_side="drop").packing is True
    assert DPOArguments(ref_model_name_or_path="some/model").ref_model_name_or_path == "some/model"
    assert TrainingArguments(output_dir="o", report_to=["jsonl"], train_file="t.jsonl").train_file == "t.jsonl"


def test_a_metric_for_best_model_that_nothing_evaluates_is_refused():
    """With eval_strategy='no' no evaluation runs while training, so the metric ranks no checkpoint: it was kept
    silently (save_total_limit then kept the newest checkpoints, not the best)."""
    with pytest.raises(ArgumentError, match="eval_strategy is 'no'") as error:
        TrainingArguments(output_dir="unused", report_to=["jsonl"], metric_for_best_model="eval_loss",
                          eval_strategy="no")
    assert error.value.field == "metric_for_best_model"
    assert "unset metric_for_best_model" in error.value.message
    assert TrainingArguments(output_dir="unused", report_to=["jsonl"], metric_for_best_model="eval_loss",
                             eval_strategy="steps", eval_steps=500).metric_for_best_model == "eval_loss"


@pytest.mark.parametrize("values,field,fix", [
    (dict(simpo_gamma=1.0), "simpo_gamma", "simpo"),  # the default loss, sigmoid, has no margin
    (dict(loss_type=["sigmoid", "sft"], loss_weights=[1.0, -0.5]), "loss_weights", ">= 0"),
    (dict(loss_type=["sigmoid"], loss_weights=[0.0]), "loss_weights", "positive"),
    (dict(loss_type=["sigmoid", "sigmoid"]), "loss_type", "loss_weights"),
], ids=["simpo_gamma", "negative_weight", "zero_weights", "twice"])
def test_a_dpo_option_no_loss_reads_or_that_turns_the_objective_is_refused(values, field, fix):
    """Read by no chosen loss (changing nothing, silently), a negative weight (maximising that loss) or no positive
    one (training nothing), a loss named twice (weighed twice)."""
    with pytest.raises(ArgumentError) as error:
        DPOArguments(**values)
    assert error.value.field == field and fix in error.value.message, error.value


def test_dpo_options_read_by_a_chosen_loss_are_accepted():
    assert DPOArguments(loss_type=["simpo"], simpo_gamma=1.0).simpo_gamma == 1.0
    assert DPOArguments(sync_ref_model=True, ref_model_mixup_alpha=0.9, ref_model_sync_steps=64).sync_ref_model
    assert DPOArguments(loss_type=["sigmoid", "sft"], loss_weights=[1.0, 0.0]).loss_weights == [1.0, 0.0]


#: transformers/TRL names whose spelling reads closest to an easytrain field that means something else: the hint
#: names the field that does what they do (and never the look-alike).
PORTED_NAMES = [
    ("per_device_train_batch_size", "--train_batch_size", "global"),
    ("per_device_eval_batch_size", "--eval_batch_size", "global"),
    ("max_completion_length", "--max_length", "prompt + completion"),
    ("dataset_text_field", "--text_column", "text_column"),
    ("dataset_num_proc", "--preprocessing_num_workers", "preprocessing_num_workers"),
    ("logging_dir", "output_dir", "tensorboard"),
    ("save_safetensors", "safetensors", "safetensors"),
    ("ref_model", "--ref_model_name_or_path", "ref_model_name_or_path"),
    ("rpo_alpha", "--loss_type sigmoid sft", "loss_weights"),
    ("batch_size", "--train_batch_size", "global"),
    ("lr", "--learning_rate", "learning_rate"),
    ("epochs", "--num_train_epochs", "num_train_epochs"),
]


@pytest.mark.parametrize("name,flag,why", PORTED_NAMES)
def test_a_ported_name_is_pointed_to_what_does_the_same_not_to_a_look_alike(name, flag, why):
    from easytrain.arguments import field_names
    from easytrain.suggestions import as_flags, unknown_name_hint

    known = field_names() + [f.name for cls in (SFTArguments, DPOArguments) for f in dataclasses.fields(cls)]
    hint = unknown_name_hint(name, None, known, as_flags)
    assert flag in hint and why in hint, hint


@pytest.mark.parametrize("name,flags", [("rpo_alpha", "--task dpo --loss_type sigmoid sft --loss_weights 1 0.5"),
                                        ("ref_model", "--task dpo --ref_model_name_or_path 0.5")])
def test_a_dpo_name_given_to_another_task_names_the_dpo_task_not_a_look_alike(name, flags):
    """`easytrain train --task sft --rpo_alpha 0.5` has no loss_type: the spelling match then said --lora_alpha."""
    from easytrain.arguments import field_names
    from easytrain.suggestions import as_flags, unknown_name_hint

    hint = unknown_name_hint(name, "0.5", field_names() + [f.name for f in dataclasses.fields(SFTArguments)], as_flags)
    assert hint.startswith(f"Did you mean {flags}?") and "lora_alpha" not in hint, hint
