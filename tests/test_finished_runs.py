"""A finished run started again: an early-stopped run trains nothing more, a rerun with nothing left to train keeps
its train metrics (Python API and results.json), an early stop is reported (console, job.json)."""

import json
import logging
from pathlib import Path

from easytrain import BaseTrainer, EarlyStopping, TrainingArguments
from easytrain.cli import main
from easytrain.jobs import Job, job, read_job

from runs import logged


def tiny_args(output_dir: Path, **overrides) -> TrainingArguments:
    values = dict(output_dir=str(output_dir), max_length=32, train_batch_size=8, eval_batch_size=8, max_steps=20,
                  learning_rate=3e-3, logging_steps=1, eval_strategy="steps", eval_steps=2, save_strategy="steps",
                  save_steps=2, report_to=["jsonl"], disable_progress_bar=True, save_pretrained_at_end=False,
                  max_train_samples=64, max_eval_samples=16)
    values.update(overrides)
    return TrainingArguments(**values)


class ScriptedScores:
    """`eval_score` improves once (step 2), then only gets worse; `eval_other` improves at every evaluation."""

    def __call__(self, trainer):
        step = int(trainer.state.step)
        return {"eval_score": 10.0 if step == 2 else 10.0 + step, "eval_other": -float(step)}


def early_stopped_run(output_dir: Path, **overrides) -> dict[str, float]:
    """Evaluations at 4, 6, 8 fail to improve on step 2's: patience 3 stops the run at step 8 of 20."""
    logs = BaseTrainer(tiny_args(output_dir, **overrides), callbacks=[EarlyStopping(metric="eval_score", patience=3)],
                       evaluators=[ScriptedScores()]).train()
    assert max(logged(output_dir)) == 8
    return logs


def resumed(output_dir: Path, stopper: EarlyStopping, **overrides) -> tuple[BaseTrainer, dict[str, float]]:
    trainer = BaseTrainer(tiny_args(output_dir, resume_from_checkpoint="latest", **overrides), callbacks=[stopper],
                          evaluators=[ScriptedScores()])
    return trainer, trainer.train()


def test_an_early_stopped_run_started_again_trains_nothing(tmp_path):
    out = tmp_path / "run"
    first = early_stopped_run(out)
    stopper = EarlyStopping(metric="eval_score", patience=3)
    trainer, logs = resumed(out, stopper)
    assert max(logged(out)) == 8, "the rerun trained another evaluation window"
    assert int(trainer.state.step) == 8
    assert stopper.stop_reason is not None and "early stopping at step 8" in stopper.stop_reason
    assert logs == first, "the rerun returns the run's last train logs"


def test_a_larger_patience_continues_an_early_stopped_run(tmp_path):
    out = tmp_path / "run"
    early_stopped_run(out)
    resumed(out, EarlyStopping(metric="eval_score", patience=5))
    assert max(logged(out)) == 12, "two more evaluations without improvement (10, 12) were allowed"


def test_another_metric_starts_early_stopping_afresh(tmp_path, caplog):
    out = tmp_path / "run"
    early_stopped_run(out)
    with caplog.at_level(logging.WARNING, logger="easytrain"):
        resumed(out, EarlyStopping(metric="eval_other", patience=3))
    assert max(logged(out)) == 20, "eval_other improves at every evaluation: the run goes on to max_steps"
    assert "monitored 'eval_score'" in caplog.text


def test_a_rerun_with_nothing_left_says_so_and_returns_the_last_train_logs(tmp_path, caplog):
    """Resumed at its last step (4 of 4), the run trains nothing: it warns how to train on (a larger max_steps)."""
    out = tmp_path / "run"
    first = BaseTrainer(tiny_args(out, max_steps=4, eval_strategy="no")).train()
    with caplog.at_level(logging.WARNING, logger="easytrain"):
        again = BaseTrainer(tiny_args(out, max_steps=4, eval_strategy="no", resume_from_checkpoint="latest")).train()
    assert "loss" in first and again == first
    (warned,) = [r.getMessage() for r in caplog.records if "nothing left to train" in r.getMessage()]
    assert "resumed at step 4" in warned and "--max_steps" in warned, warned


def test_results_json_keeps_the_train_metrics_of_a_rerun_with_nothing_left(tmp_path):
    out = tmp_path / "run"
    flags = ["--max_length", "16", "--train_batch_size", "4", "--eval_batch_size", "4", "--max_steps", "3",
             "--max_train_samples", "32", "--max_eval_samples", "8", "--save_steps", "3", "--report_to", "jsonl",
             "--disable_progress_bar", "--save_pretrained_at_end", "false"]
    assert main(["train", "--output_dir", str(out), *flags]) == 0
    before = json.loads((out / "results.json").read_text())
    assert main(["train", "--config", str(out / "arguments.json")]) == 0
    after = json.loads((out / "results.json").read_text())
    train_keys = sorted(key for key in before if key.startswith("train_"))
    assert train_keys and sorted(key for key in after if key.startswith("train_")) == train_keys
    assert {key: after[key] for key in train_keys} == {key: before[key] for key in train_keys}


def test_an_early_stop_is_logged_and_recorded_in_job_json(tmp_path, caplog):
    out = tmp_path / "run"
    with caplog.at_level(logging.INFO, logger="easytrain"):
        early_stopped_run(out)
    lines = [record.getMessage() for record in caplog.records if "early stopping at step 8" in record.getMessage()]
    assert len(lines) == 1, caplog.text
    record = read_job(out)
    assert record["status"] == "completed" and record["step"] == 8
    assert record["stop_reason"] is not None and "early stopping at step 8" in record["stop_reason"]


def test_an_early_stop_inside_an_enclosing_job_is_recorded_when_it_completes(tmp_path):
    out = tmp_path / "run"
    with job(out, report_to=["none"]):
        early_stopped_run(out)
    record = read_job(out)
    assert record["status"] == "completed"
    assert record["stop_reason"] is not None and "early stopping at step 8" in record["stop_reason"]


def test_a_run_completed_normally_has_no_stop_reason(tmp_path):
    out = tmp_path / "run"
    BaseTrainer(tiny_args(out, max_steps=2, eval_strategy="no")).train()
    assert read_job(out)["stop_reason"] is None


def test_a_new_start_of_a_completed_run_keeps_its_progress_while_queued(tmp_path):
    with job(tmp_path, report_to=["none"]) as finished:
        finished.progress_update(100)
    seen: list[dict] = []
    again = Job(tmp_path, report_to=["none"], listeners=[seen.append])
    again.open()
    assert (seen[0]["status"], seen[0]["progress"]) == ("queued", 100.0)
