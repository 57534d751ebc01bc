"""A resume warns of another learning-rate schedule only where the run's length or shape changed: every max_steps
<= 0 means "train num_train_epochs" (earlier docs spelled it 0, arguments now store -1), and num_train_epochs decides
nothing while a positive max_steps does."""

import logging

import pytest

from easytrain import TrainingArguments
from easytrain.trainers.resume import check_resumable


def schedule_warnings(caplog, stored: dict, current: dict) -> str:
    """The schedule warning `check_resumable` logs for a checkpoint of `stored` arguments resumed with `current`."""
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="easytrain"):
        assert check_resumable({"format_version": 1, "arguments": stored, "model_config": None},
                               {"arguments": current, "model_config": None}) == []
    return "\n".join(r.getMessage() for r in caplog.records if "learning-rate schedule" in r.getMessage())


def arguments(tmp_path, **given) -> dict:
    return TrainingArguments(output_dir=str(tmp_path / "run"), **given).to_dict()


@pytest.mark.parametrize("stored_steps", [0, -1, -5])
def test_an_epoch_run_of_any_spelling_resumes_with_num_train_epochs_alone_without_a_warning(tmp_path, caplog,
                                                                                               stored_steps):
    """A checkpoint of max_steps=0 (the older docs' spelling) resumed with num_train_epochs=2 alone (stored -1)
    warned "max_steps: checkpoint 0 vs now -1"; both train 2 epochs."""
    current = arguments(tmp_path, num_train_epochs=2)
    stored = {**current, "max_steps": stored_steps}
    assert schedule_warnings(caplog, stored, current) == ""


def test_num_train_epochs_beside_a_positive_max_steps_is_not_a_schedule_change(tmp_path, caplog):
    """max_steps decides the length on both sides: the epochs given beside it change nothing."""
    current = arguments(tmp_path, max_steps=100, num_train_epochs=5)
    stored = {**current, "num_train_epochs": 3}
    assert schedule_warnings(caplog, stored, current) == ""


@pytest.mark.parametrize("stored_length, current_length, named", [
    ((0, 2), (-1, 3), "num_train_epochs: checkpoint 2 vs now 3"),  # both epoch runs: the epochs decide
    ((100, 3), (200, 3), "max_steps: checkpoint 100 vs now 200"),
    ((0, 2), (100, 2), "max_steps: checkpoint 0 vs now 100"),  # epochs -> steps: the values as stored and given
    ((100, 3), (-1, 3), "max_steps: checkpoint 100 vs now -1"),
])
def test_a_length_that_changed_is_still_warned_about_with_the_values_given(tmp_path, caplog, stored_length,
                                                                          current_length, named):
    base = arguments(tmp_path)
    stored, current = ({**base, "max_steps": steps, "num_train_epochs": epochs}
                       for steps, epochs in (stored_length, current_length))
    warned = schedule_warnings(caplog, stored, current)
    assert named in warned, warned
    assert warned.count(" vs now ") == 1, warned  # the other field of the length is not listed


def test_the_other_schedule_fields_are_still_compared(tmp_path, caplog):
    current = arguments(tmp_path, num_train_epochs=2)
    stored = {**current, "max_steps": 0, "learning_rate": 1.0}
    assert "learning_rate: checkpoint 1.0" in schedule_warnings(caplog, stored, current)
