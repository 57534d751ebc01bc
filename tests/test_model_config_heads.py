"""Attention heads that cannot be grouped (num_attention_heads not a multiple of num_key_value_heads, or no
heads) are refused from the config alone: by ``check_buildable``, so a trainer refuses them before tokenising,
and by the model's construction, with the same message."""

import datasets
import pytest

from easytrain import ArgumentError, BaseTrainer
from easytrain.models import init_model
from easytrain.models.families import ConfigError, check_buildable

from model_configs import family_config
import test_model_config_refusal as refusal
from test_model_config_refusal import _args, _checkpoint

tokenised = refusal.tokenised  # the spy on tokenisation, a fixture

UNGROUPABLE = {
    "not-a-multiple": (dict(num_key_value_heads=3),
                       r"num_attention_heads \(4\) must be a multiple of config.num_key_value_heads \(3\)"),
    "no-key-value-heads": (dict(num_key_value_heads=0), r"num_key_value_heads = 0 must be a positive"),
    "no-heads": (dict(num_attention_heads=0, head_dim=16), r"num_attention_heads = 0 must be a positive"),
}


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


@pytest.mark.parametrize("case", sorted(UNGROUPABLE))
def test_a_trainer_refuses_them_before_tokenising(tmp_path, tokenizer_dir, text_lines, tokenised, case):
    changes, named = UNGROUPABLE[case]
    path = _checkpoint(tmp_path, tokenizer_dir, changes)
    trainer = BaseTrainer(_args(tmp_path, model_name_or_path=path),
                          dataset_train=datasets.Dataset.from_dict({"text": text_lines}))
    with pytest.raises(ArgumentError, match=named) as error:
        trainer.train()
    assert error.value.field == "model_name_or_path" and path in str(error.value)
    assert not tokenised
