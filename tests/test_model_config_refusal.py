"""A model config the model cannot build (another family, RoPE scaling, an unknown activation, attention dropout,
attention heads that cannot be grouped) is refused by name when the trainer reads it, before any text is tokenised:
not after the whole dataset was. The heads are refused from the config alone, by ``check_buildable`` and by the
model's construction, with the same message."""

import json
import shutil

import datasets
import pytest

from easytrain import ArgumentError, BaseTrainer, TrainingArguments
from easytrain.cli import main
from easytrain.models import init_model
from easytrain.models.families import ConfigError, check_buildable

import tokenising_spy
from model_configs import family_config

DYNAMIC = {"rope_type": "dynamic", "factor": 4.0, "rope_theta": 1e6}  # frequencies that follow the sequence seen
# (config.json fields changed, what the refusal names: the field and its value)
UNBUILDABLE = {
    "rope_scaling": ({"rope_parameters": DYNAMIC}, r"rope_type'\] = 'dynamic'"),
    "activation": ({"hidden_act": "gelu_new"}, r"hidden_act = 'gelu_new'.*choose one of"),
    "attention_dropout": ({"attention_dropout": 0.1}, r"attention_dropout = 0\.1.*Set it to 0\.0"),
    "family": ({"model_type": "gemma"}, r"model_type = 'gemma'.*qwen3"),
}
#: Attention heads that cannot be grouped: num_attention_heads not a multiple of num_key_value_heads, or no heads.
UNGROUPABLE = {
    "not-a-multiple": (dict(num_key_value_heads=3),
                       r"num_attention_heads \(4\) must be a multiple of config.num_key_value_heads \(3\)"),
    "no-key-value-heads": (dict(num_key_value_heads=0), r"num_key_value_heads = 0 must be a positive"),
    "no-heads": (dict(num_attention_heads=0, head_dim=16), r"num_attention_heads = 0 must be a positive"),
}
REFUSED = UNBUILDABLE | UNGROUPABLE


tokenised = tokenising_spy.tokenised  # the spy on tokenisation, a fixture


def _config_fields(**changes) -> dict:
    """A tiny Qwen2 config (room for the test tokenizer's 300 tokens) with `changes` written over it."""
    return family_config("qwen2", vocab_size=320).to_dict() | changes


def _checkpoint(tmp_path, tokenizer_dir, changes) -> str:
    """A Qwen2 model directory (config.json and tokenizer files; no weights: the refusal reads none)."""
    directory = tmp_path / "model"
    shutil.copytree(tokenizer_dir, directory)
    (directory / "config.json").write_text(json.dumps(_config_fields(**changes)))
    return str(directory)


def _args(tmp_path, **kwargs) -> TrainingArguments:
    return TrainingArguments(output_dir=str(tmp_path / "run"), max_steps=2, max_length=16, train_batch_size=4,
                             eval_strategy="no", save_strategy="no", save_pretrained_at_end=False,
                             report_to=["none"], **kwargs)


@pytest.mark.parametrize("case", sorted(UNGROUPABLE))
def test_check_buildable_and_the_model_refuse_the_same_heads(case):
    changes, named = UNGROUPABLE[case]
    config = family_config("qwen2", **changes)
    with pytest.raises(ConfigError, match=named) as checked:
        check_buildable(config)
    with pytest.raises(ConfigError) as built:
        init_model(config)
    assert str(built.value) == str(checked.value)


def test_grouped_heads_are_accepted():
    check_buildable(family_config("qwen2", num_attention_heads=6, num_key_value_heads=3))


@pytest.mark.parametrize("case", sorted(REFUSED))
def test_pretrained_config_is_refused_before_tokenising(tmp_path, tokenizer_dir, text_lines, tokenised, case):
    changes, named = REFUSED[case]
    path = _checkpoint(tmp_path, tokenizer_dir, changes)
    trainer = BaseTrainer(_args(tmp_path, model_name_or_path=path),
                          dataset_train=datasets.Dataset.from_dict({"text": text_lines}))
    with pytest.raises(ArgumentError, match=named) as error:
        trainer.train()
    assert error.value.field == "model_name_or_path" and path in str(error.value)
    assert not tokenised


@pytest.mark.parametrize("case", ["rope_scaling", "activation", "attention_dropout"])
def test_model_config_file_is_refused_before_tokenising(tmp_path, tokenizer_dir, text_lines, tokenised, case):
    changes, named = UNBUILDABLE[case]
    config_file = tmp_path / "config.json"
    config_file.write_text(json.dumps(_config_fields(**changes)))
    trainer = BaseTrainer(_args(tmp_path, model_config=str(config_file), tokenizer_name=tokenizer_dir),
                          dataset_train=datasets.Dataset.from_dict({"text": text_lines}))
    with pytest.raises(ArgumentError, match=named) as error:
        trainer.train()
    assert error.value.field == "model_config" and str(config_file) in str(error.value)
    assert not tokenised


def test_command_line_refuses_before_tokenising(tmp_path, tokenizer_dir, text_lines, tokenised, capsys):
    path = _checkpoint(tmp_path, tokenizer_dir, UNBUILDABLE["rope_scaling"][0])
    train_file = tmp_path / "train.txt"
    train_file.write_text("\n".join(text_lines))
    code = main(["train", "--output_dir", str(tmp_path / "run"), "--model_name_or_path", path,
                 "--train_file", str(train_file), "--max_steps", "2", "--max_length", "16",
                 "--train_batch_size", "4", "--eval_strategy", "no", "--save_strategy", "no"])
    assert code == 2 and not tokenised
    assert "model_name_or_path" in capsys.readouterr().err


def test_a_supported_config_still_reaches_tokenising(tmp_path, tokenizer_dir, text_lines, tokenised):
    """The refusal is the config's: the same directory with a buildable config goes on to the data."""
    path = _checkpoint(tmp_path, tokenizer_dir, {})
    trainer = BaseTrainer(_args(tmp_path, model_name_or_path=path),
                          dataset_train=datasets.Dataset.from_dict({"text": text_lines}))
    with pytest.raises(AssertionError, match="tokenised before"):
        trainer.train()
    assert len(tokenised) == 1


@pytest.mark.parametrize("case", ["rope_scaling", "family"])
def test_a_dpo_reference_config_is_refused_when_the_trainer_is_built(tmp_path, case):
    """`ref_model_name_or_path` names a model directory whose config the model cannot build: refused, naming that
    field, when the trainer is built (it failed only when the reference loaded, after the data was tokenised)."""
    from easytrain.trainers.dpo import DPOArguments, DPOTrainer

    changes, named = UNBUILDABLE[case]
    reference = tmp_path / "reference"
    reference.mkdir()
    (reference / "config.json").write_text(json.dumps(_config_fields(**changes)))
    with pytest.raises(ArgumentError, match=named) as refused:
        DPOTrainer(_args(tmp_path), DPOArguments(ref_model_name_or_path=str(reference)))
    assert refused.value.field == "ref_model_name_or_path"
