"""`max_eval_samples` caps the default language-model task's exact-match prompts as it caps the rows `eval_loss` is
over (SFT already takes the smaller of the two): with it at 10, an evaluation generated 256 prompts."""

import pytest

from easytrain import BaseTrainer, TrainingArguments


def arguments(tmp_path, max_eval_samples) -> TrainingArguments:
    return TrainingArguments(output_dir=str(tmp_path), max_length=16, train_batch_size=4, eval_batch_size=4,
                             max_steps=1, eval_strategy="no", save_strategy="no", report_to=["none"],
                             disable_progress_bar=True, save_pretrained_at_end=False, max_train_samples=64,
                             max_eval_samples=max_eval_samples)


@pytest.mark.parametrize("max_eval_samples, prompts", [(10, 10), (None, 256)])
def test_max_eval_samples_caps_the_default_exact_match_prompts(tmp_path, max_eval_samples, prompts):
    trainer = BaseTrainer(arguments(tmp_path, max_eval_samples))
    trainer.prepare_datasets()
    (exact_match,) = trainer.evaluators
    assert len(exact_match.prompts) == len(exact_match.answers) == prompts
