"""The tiny evaluated run that the best-metric direction tests build their arguments from."""

from __future__ import annotations

from easytrain import TrainingArguments


def arguments(tmp_path, **overrides) -> TrainingArguments:
    """Two updates of the lm task evaluated at the second, nothing saved or exported; `overrides` replace fields."""
    values = dict(output_dir=str(tmp_path), max_length=32, train_batch_size=8, eval_batch_size=8, max_steps=2,
                  logging_steps=1, eval_strategy="steps", eval_steps=2, save_strategy="no", report_to=["none"],
                  disable_progress_bar=True, save_pretrained_at_end=False, max_train_samples=64, max_eval_samples=16)
    return TrainingArguments(**(values | overrides))
