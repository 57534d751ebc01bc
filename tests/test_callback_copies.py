"""Each callback gets its own copy of the logs and metrics: one that changes or adds keys alters neither what the
run records (metrics.jsonl, results, job.json, the checkpoints' metrics and the best-checkpoint ranking) nor what
the callbacks after it (early stopping, job reporting) see."""

from __future__ import annotations

import json
from pathlib import Path

from easytrain import BaseTrainer, Callback, TrainingArguments
from easytrain.callbacks import CallbackList


class Mutator(Callback):
    """Rewrites and removes values, and adds keys of its own: a callback the trainer must be robust to."""

    def on_log(self, trainer, step, logs):
        logs["loss"] = 123.0
        logs.pop("learning_rate", None)
        logs["mine"] = 1.0

    def on_evaluate(self, trainer, step, metrics):
        metrics["eval_loss"] = -float(step)
        metrics["eval_accuracy"] = float(step == 2)


class Recorder(Callback):
    def __init__(self):
        self.logs, self.evals = [], []

    def on_log(self, trainer, step, logs):
        self.logs.append((step, dict(logs)))

    def on_evaluate(self, trainer, step, metrics):
        self.evals.append((step, dict(metrics)))


def test_a_later_callback_and_the_caller_see_the_original_dict() -> None:
    recorder, logs = Recorder(), {"loss": 2.0, "learning_rate": 0.1}
    CallbackList([Mutator(), recorder]).on_log(None, 1, logs)
    assert logs == {"loss": 2.0, "learning_rate": 0.1}
    assert recorder.logs == [(1, {"loss": 2.0, "learning_rate": 0.1})]


def test_a_callback_may_still_add_keys_for_itself() -> None:
    class Adder(Callback):
        def on_evaluate(self, trainer, step, metrics):
            metrics["eval_mine"] = 1.0
            self.seen = dict(metrics)

    adder = Adder()
    CallbackList([adder]).on_evaluate(None, 1, {"eval_loss": 1.0})
    assert adder.seen == {"eval_loss": 1.0, "eval_mine": 1.0}


def test_a_mutating_callback_changes_no_record_of_the_run(tmp_path) -> None:
    args = TrainingArguments(output_dir=str(tmp_path), task="lm", max_length=32, train_batch_size=8,
                             eval_batch_size=8, max_steps=6, logging_steps=2, eval_strategy="steps", eval_steps=2,
                             save_strategy="steps", save_steps=2, save_total_limit=None,
                             metric_for_best_model="eval_loss", load_best_model_at_end=True,
                             report_to=["jsonl"], disable_progress_bar=True,
                             save_pretrained_at_end=False, max_train_samples=128, max_eval_samples=16,
                             learning_rate=3e-3, seed=0)
    recorder = Recorder()
    summary = dict(BaseTrainer(args, callbacks=[Mutator(), recorder]).train())
    records = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    train = [{k: v for k, v in r.items() if k not in ("step", "split", "time")} for r in records
             if r["split"] == "train"]
    evals = {r["step"]: {k: v for k, v in r.items() if k not in ("step", "split", "time")} for r in records
             if r["split"] == "eval"}
    assert [logs for _, logs in recorder.logs] == train
    assert dict(recorder.evals) == evals
    assert all(summary[key] == value for key, value in train[-1].items() if key in summary), (summary, train[-1])
    assert summary["loss"] == train[-1]["loss"] and "mine" not in summary
    for step, metrics in evals.items():  # what ranks the checkpoints
        stored = json.loads((tmp_path / "checkpoints" / str(step) / "metrics" / "metrics").read_text())
        assert stored == metrics, (step, stored, metrics)
    assert summary["best_step"] == min(evals, key=lambda step: evals[step]["eval_loss"])
    job = json.loads((Path(tmp_path) / "job.json").read_text())
    assert {k: v for k, v in job["metrics"]["eval"].items() if k != "step"} == evals[max(evals)]
    assert job["metrics"]["train"]["loss"] == train[-1]["loss"]
