"""Float columns of the training rows (loss weights, precomputed reference log-probs) in a saved data position: an
edit is reported when the position is restored, while values recomputed on other hardware (their last bits differ)
resume silently, and neither refuses the resume: float columns pick no example, so the position stays valid."""

import logging

import datasets
import numpy as np
import pytest

from easytrain.data import TrainBatches
from easytrain.data.digest import rows_digest
from easytrain.trainers.resume import check_data_position

FLOATS = "data_floats"


def rows(**floats: np.ndarray) -> dict[str, np.ndarray]:
    ids = np.arange(16 * 9, dtype=np.int32).reshape(16, 9) * 7 % 301
    return {"input_ids": ids, "weight": np.linspace(0.5, 2.0, 16, dtype=np.float32),
            "ref_logps": np.linspace(-40.0, -3.0, 32, dtype=np.float32).reshape(16, 2)} | floats


def restore(saved: dict, now: dict, caplog, as_dataset: bool = False) -> list[str]:
    """The warnings restoring `saved` (a position over `rows()`) into a loader over `now` logs; a refusal raises."""
    source = datasets.Dataset.from_dict(now) if as_dataset else now
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="easytrain"):
        iterator = TrainBatches(source, 4, seed=0).iterator()
        iterator.set_state(saved)
    assert iterator.step == 3
    return [record.getMessage() for record in caplog.records if record.levelno >= logging.WARNING]


def saved_position(as_dataset: bool = False) -> dict:
    source = datasets.Dataset.from_dict(rows()) if as_dataset else rows()
    return TrainBatches(source, 4, seed=0).iterator(3).get_state()


@pytest.mark.parametrize("as_dataset", [False, True])
def test_an_edited_float_column_is_reported_on_restore(caplog, as_dataset):
    weight = rows()["weight"].copy()
    weight[11] = 0.0  # one example's loss weight
    warnings = restore(saved_position(as_dataset), rows(weight=weight), caplog, as_dataset)
    assert len(warnings) == 1 and "'weight'" in warnings[0] and "ref_logps" not in warnings[0]
    assert "the resumed run trains on the new values" in warnings[0]


def test_reference_log_probs_from_another_model_are_reported(caplog):
    other = rows()["ref_logps"] * np.float32(1.3)
    warnings = restore(saved_position(), rows(ref_logps=other), caplog)
    assert len(warnings) == 1 and "'ref_logps'" in warnings[0]


@pytest.mark.parametrize("as_dataset", [False, True])
def test_last_bit_differences_resume_silently(caplog, as_dataset):
    """Every value one ulp off, half of them sitting on a rounding boundary (x.5 steps): no refusal, no warning."""
    on_boundaries = np.arange(32, dtype=np.float32).reshape(16, 2) * np.float32(0.5) - np.float32(20.25)
    saved_rows = rows(ref_logps=on_boundaries)
    source = datasets.Dataset.from_dict(saved_rows) if as_dataset else saved_rows
    saved = TrainBatches(source, 4, seed=0).iterator(3).get_state()
    nudged = rows(ref_logps=np.nextafter(on_boundaries, np.float32(0)),
                  weight=np.nextafter(saved_rows["weight"], np.float32(9)))
    assert restore(saved, nudged, caplog, as_dataset) == []


def test_a_float_only_change_keeps_the_position_with_or_without_allow_data_order_change(caplog):
    weight = rows()["weight"] * np.float32(2)
    saved = saved_position()
    loader = TrainBatches(rows(weight=weight), 4, seed=0)
    assert check_data_position(saved, loader.fingerprint, allow=False) is True
    assert check_data_position(saved, loader.fingerprint, allow=True) is True
    assert rows_digest(rows()) == rows_digest(rows(weight=weight))  # the examples' identity is unchanged


def test_the_float_record_is_part_of_the_position_not_of_the_fingerprint():
    """A checkpoint written before float columns were recorded lacks the record: a fingerprint key would read as a
    damaged position there; the record travels beside it and is compared only where both sides have one."""
    loader = TrainBatches(rows(), 4, seed=0)
    state = loader.iterator(3).get_state()
    assert FLOATS in state and FLOATS not in loader.fingerprint
    assert sorted(state[FLOATS]) == ["ref_logps", "weight"]
    assert FLOATS not in TrainBatches({"input_ids": rows()["input_ids"]}, 4, seed=0).iterator().get_state()


def test_a_position_without_a_float_record_restores_silently(caplog):
    old = {key: value for key, value in saved_position().items() if key != FLOATS}
    weight = rows()["weight"] * np.float32(2)
    assert restore(old, rows(weight=weight), caplog) == []


def test_a_float_column_added_or_removed_is_reported(caplog):
    without = {key: value for key, value in rows().items() if key != "weight"}
    warnings = restore(saved_position(), without, caplog)
    assert len(warnings) == 1 and "'weight'" in warnings[0]
