"""A split that packing leaves without a row is named in the error, as a split that tokenisation empties is
(`token_range.rows_of`). Tokenisation keeps only examples with a supervised target, so packing drops all of a
split's examples only when tokenisation changes (a subclass, a future rule): here it is made to keep examples whose
one supervised token is the first, which predicts nothing."""

import datasets
import pytest
from chat_fixtures import build_chat_tokenizer

from easytrain import TrainingArguments
from easytrain.data.row_errors import NoExampleLeftError
from easytrain.trainers import sft
from easytrain.trainers.sft import SFTArguments, SFTTrainer

CHAT = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}


def test_a_split_packing_empties_is_named(tmp_path, monkeypatch):
    tokenize = sft.tokenize_sft_dataset

    def first_token_supervised(*args, **kwargs):
        tokenized, stats = tokenize(*args, **kwargs)
        return datasets.Dataset.from_dict({"input_ids": [[1, 2]] * len(tokenized),
                                           "loss_mask": [[1, 0]] * len(tokenized)}), stats

    monkeypatch.setattr(sft, "tokenize_sft_dataset", first_token_supervised)
    args = TrainingArguments(output_dir=str(tmp_path / "run"), model_config="tiny", max_length=32, train_batch_size=4,
                             max_steps=1, save_strategy="no", eval_strategy="no", report_to=["none"],
                             disable_progress_bar=True, save_pretrained_at_end=False)
    trainer = SFTTrainer(args, SFTArguments(packing=True), tokenizer=build_chat_tokenizer("chatml"),
                         dataset_train=datasets.Dataset.from_list([CHAT] * 8))
    with pytest.raises(NoExampleLeftError, match="Nothing to pack") as info:
        trainer.prepare_datasets()
    assert "the 'train' split" in str(info.value) and "dataset_train" in str(info.value), str(info.value)
