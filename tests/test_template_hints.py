"""Errors that ask for another chat template name only fields a user can set (`SFTTrainer` has no `chat_template`)."""

import dataclasses
import re

import pytest

from easytrain.data import DataError
from easytrain.data.chat_templates import GIVE_TEMPLATE, require_generation_markers
from easytrain.data.preference_data import PreferenceDataOptions
from easytrain.data.sft import SFTDataOptions
from easytrain.trainers.dpo_arguments import DPOArguments
from easytrain.trainers.sft import SFTArguments


def test_every_field_the_hint_names_exists():
    fields_of = {cls.__name__: {field.name for field in dataclasses.fields(cls)}
                 for cls in (SFTArguments, DPOArguments, SFTDataOptions, PreferenceDataOptions)}
    named = re.findall(r"`(\w+)` of `(\w+)`/`(\w+)`", GIVE_TEMPLATE)
    assert len(named) == 2, GIVE_TEMPLATE
    for field, *classes in named:
        for cls in classes:
            assert field in fields_of[cls], (field, cls)


def test_the_missing_markers_error_gives_the_hint():
    with pytest.raises(DataError) as info:
        require_generation_markers("{% for m in messages %}{{ m.content }}{% endfor %}")
    assert GIVE_TEMPLATE in str(info.value) and "pass `chat_template`" not in str(info.value)
