"""The work a trainer's set-up and first steps do: each program traced once, not again for a question its first
trace already answered."""

from easytrain import BaseTrainer, TrainingArguments


def small_args(tmp_path, **overrides) -> TrainingArguments:
    values = dict(output_dir=str(tmp_path / "run"), max_length=16, train_batch_size=4, eval_batch_size=4, max_steps=1,
                  logging_steps=1, eval_strategy="no", save_strategy="no", report_to=["jsonl"],
                  disable_progress_bar=True, save_pretrained_at_end=False, max_train_samples=16, max_eval_samples=8)
    return TrainingArguments(**(values | overrides))


class CountingTrainer(BaseTrainer):
    """Counts the traces of its loss in evaluation mode: one per trace of the eval step."""

    eval_traces = 0

    def compute_loss(self, model, batch, rng, train, frozen):
        if not train:
            type(self).eval_traces += 1
        return super().compute_loss(model, batch, rng, train, frozen)


def test_the_eval_step_is_traced_once_for_its_metric_names_and_its_evaluations(tmp_path):
    CountingTrainer.eval_traces = 0
    trainer = CountingTrainer(small_args(tmp_path))
    trainer.setup()  # the eval metrics' names are checked here, from a trace of the eval step
    first = trainer.evaluate()
    assert CountingTrainer.eval_traces == 1
    assert trainer.evaluate() == first  # the same program, the same state
    assert CountingTrainer.eval_traces == 1
