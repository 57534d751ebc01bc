"""`max_train_samples` limits the training rows and `max_eval_samples` the validation rows, each its own: an SFT or
DPO run whose validation took the training limit evaluated (and chose its best checkpoint) on another number of rows
than it was told, silently, since every test set the two limits alike or only one of them."""

import pytest

from easytrain import TrainingArguments
from easytrain.data.loader import count_rows
from easytrain.trainers.dpo import DPOTrainer
from easytrain.trainers.sft import SFTTrainer


@pytest.mark.parametrize("trainer_class", [SFTTrainer, DPOTrainer])
@pytest.mark.parametrize("train_limit, eval_limit", [(24, 8), (8, 12)])
def test_each_split_keeps_the_rows_of_its_own_limit(tmp_path, trainer_class, train_limit, eval_limit):
    arguments = TrainingArguments(output_dir=str(tmp_path), max_length=16, train_batch_size=8, max_steps=1,
                                  eval_strategy="no", save_strategy="no", report_to=[], disable_progress_bar=True,
                                  save_pretrained_at_end=False, max_train_samples=train_limit,
                                  max_eval_samples=eval_limit)
    train, validation = trainer_class(arguments).prepare_datasets()  # the embedded data: hundreds of rows each
    assert (count_rows(train), count_rows(validation)) == (train_limit, eval_limit)
