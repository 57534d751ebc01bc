"""An early-stopped run rerun with another patience: its stop reason and what it does follow the rerun's arguments.

The evaluations without improvement that the stopped run counted are facts about its model; the patience is the
rerun's setting. A lower patience stops the rerun at once (it trained past the point it would stop at: nothing more
is trained), with a reason that names the count and the patience in force. A higher one is a request to train on:
the rerun continues, counting on from the evaluations it had, and stops where the new patience says, with a reason
of its own. Neither shows the first run's reason, which named another patience (console, job.json, the callback).
"""

import logging

from easytrain import EarlyStopping
from easytrain.jobs import read_job

from runs import logged
from test_finished_runs import early_stopped_run, resumed


def test_a_lower_patience_stops_the_rerun_at_once_with_its_own_reason(tmp_path, caplog):
    out = tmp_path / "run"
    early_stopped_run(out)  # patience 3: evaluations at 4, 6, 8 without improvement, stopped at step 8
    stopper = EarlyStopping(metric="eval_score", patience=2)
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="easytrain"):
        trainer, _ = resumed(out, stopper)
    assert int(trainer.state.step) == 8 and max(logged(out)) == 8, "nothing more trained"
    reason = stopper.stop_reason
    assert reason is not None and "3 evaluation(s)" in reason and "patience 2" in reason, reason
    assert "for 3 evaluation(s);" not in reason, "the first run's reason (patience 3) is not shown as this run's"
    assert read_job(out)["stop_reason"] == reason
    lines = [record.getMessage() for record in caplog.records if "training stopped after step 8" in record.getMessage()]
    assert len(lines) == 1 and reason in lines[0], caplog.text


def test_a_higher_patience_trains_on_and_stops_with_its_own_reason(tmp_path):
    out = tmp_path / "run"
    early_stopped_run(out)
    stopper = EarlyStopping(metric="eval_score", patience=5)
    trainer, _ = resumed(out, stopper)
    assert int(trainer.state.step) == 12 and max(logged(out)) == 12, "evaluations at 10 and 12 were allowed"
    reason = stopper.stop_reason
    assert reason is not None and "early stopping at step 12" in reason and "patience 5" in reason, reason
    assert read_job(out)["stop_reason"] == reason


def test_the_same_patience_keeps_the_stop_at_its_step(tmp_path):
    out = tmp_path / "run"
    early_stopped_run(out)
    stopper = EarlyStopping(metric="eval_score", patience=3)
    trainer, _ = resumed(out, stopper)
    assert int(trainer.state.step) == 8
    assert "early stopping at step 8" in stopper.stop_reason and "patience 3" in stopper.stop_reason
    assert read_job(out)["stop_reason"] == stopper.stop_reason
