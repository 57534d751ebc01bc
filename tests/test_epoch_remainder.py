"""A training set that the global batch does not divide leaves rows out of every epoch (the data order and step
count stay as they are, so resume is unchanged): said once at set-up, and in num_train_epochs' help."""

import dataclasses
import logging

from easytrain import TrainingArguments
from test_custom_module_errors import Classifier, blobs


def _trainer(tmp_path, rows: int, **overrides):
    class Rows(Classifier):
        def prepare_datasets(self):
            return blobs(rows, 1), None

    return Rows(TrainingArguments(**(dict(output_dir=str(tmp_path), max_steps=0, num_train_epochs=1,
                                          train_batch_size=16, eval_strategy="no", save_strategy="no",
                                          report_to=["none"], disable_progress_bar=True,
                                          save_pretrained_at_end=False) | overrides)))


def _warnings(caplog):
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING and "epoch" in r.getMessage()]


def test_rows_left_out_of_each_epoch_are_warned_about_once(tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="easytrain"):
        data = _trainer(tmp_path, 31).configure_dataloaders()
    assert data.total_steps == 1 and data.steps_per_epoch == 1  # unchanged: 16 of the 31 rows, one step
    (warned,) = _warnings(caplog)
    assert "31 training rows" in warned and "leaves out 15" in warned and "train_batch_size=16" in warned, warned


def test_no_warning_when_the_batch_divides_the_rows_or_no_epoch_ends(tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="easytrain"):
        _trainer(tmp_path / "a", 32, num_train_epochs=2).configure_dataloaders()
        _trainer(tmp_path / "b", 47, max_steps=1, num_train_epochs=3).configure_dataloaders()  # 1 step of 2
    assert not _warnings(caplog)
    with caplog.at_level(logging.WARNING, logger="easytrain"):
        _trainer(tmp_path / "c", 47, max_steps=3, num_train_epochs=3).configure_dataloaders()  # 15 rows out
    assert len(_warnings(caplog)) == 1


def test_num_train_epochs_help_says_the_remainder_is_dropped():
    (field,) = [f for f in dataclasses.fields(TrainingArguments) if f.name == "num_train_epochs"]
    assert "remainder" in field.metadata["help"] and "train_batch_size" in field.metadata["help"]


def test_num_train_epochs_under_a_positive_max_steps_is_warned_about(tmp_path, caplog):
    """A max_steps given decides the length whenever it is positive: a num_train_epochs given alongside it is
    ignored, and said so (tests/test_run_length.py: given alone, it decides)."""
    with caplog.at_level(logging.WARNING, logger="easytrain"):
        TrainingArguments(output_dir=str(tmp_path), num_train_epochs=5, max_steps=11)
    assert any("num_train_epochs=5 has no effect: max_steps=11" in message and "--max_steps -1" in message
               for message in _warnings(caplog)), caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="easytrain"):
        TrainingArguments(output_dir=str(tmp_path), num_train_epochs=5, max_steps=0)
        TrainingArguments(output_dir=str(tmp_path), num_train_epochs=5)
        TrainingArguments(output_dir=str(tmp_path))
    assert not _warnings(caplog), caplog.text
