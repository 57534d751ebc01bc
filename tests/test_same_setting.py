"""`same_setting`: a checkpoint's '' for an optional path it read as unset is the None a rerun must now give."""

import pytest

from easytrain.argument_checks import BLANK_WAS_UNSET, same_setting
from easytrain.trainers import resume_checks


@pytest.mark.parametrize("name, stored, current, same", [
    ("train_file", "", None, True),
    ("train_file", None, "", True),
    ("train_file", "a.jsonl", "a.jsonl", True),
    ("train_file", "", "a.jsonl", False),
    ("system_prompt", "", None, False),  # a task's own '' is a value, not unset
    ("seed", 1, 2, False),
])
def test_blank_and_none_are_one_setting_only_for_the_paths_once_read_as_unset(name, stored, current, same):
    assert same_setting(name, stored, current) is same


def test_resume_checks_still_offers_the_rule():
    assert resume_checks.same_setting is same_setting and resume_checks.BLANK_WAS_UNSET is BLANK_WAS_UNSET
