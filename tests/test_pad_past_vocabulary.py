"""A tokenizer whose pad is at or past the model's `vocab_size` (a pad added to the tokenizer after the model was
trained; only a given `model=` gets there): SFT and DPO pad with an in-range id instead (`token_range.filler_id`).
Padding is masked (attention_mask, loss_mask 0), so its id never reaches the loss: the first step's loss is the one
padding with an in-range pad gives. A real token equal to that pad, in the text, is still refused with the data."""

import datasets
import numpy as np
import pytest
from flax import nnx
from transformers import AutoTokenizer

from easytrain import TrainingArguments
from easytrain.data.token_range import TokenRangeError, filler_id
from easytrain.models import LlamaForCausalLM
from easytrain.trainers.dpo import DPOTrainer
from easytrain.trainers.sft import SFTTrainer
from model_configs import tiny_config

NEW_PAD = "<new_pad>"


def _args(tmp_path, name: str) -> TrainingArguments:
    return TrainingArguments(output_dir=str(tmp_path / name), max_steps=1, max_length=32, train_batch_size=4,
                             save_strategy="no", eval_strategy="no", save_pretrained_at_end=False, report_to=["none"],
                             disable_progress_bar=True, validation_split_percentage=0, seed=0)


def _tokenizers(tokenizer_dir):
    """The test tokenizer padding with an in-range id other than 0 (its EOS), and the same one with a new pad token
    added past the vocabulary of a model trained without it."""
    in_range = AutoTokenizer.from_pretrained(tokenizer_dir)
    in_range.pad_token = in_range.eos_token
    grown = AutoTokenizer.from_pretrained(tokenizer_dir)
    grown.add_special_tokens({"pad_token": NEW_PAD})
    assert in_range.pad_token_id not in (None, 0) and grown.pad_token_id == len(in_range), "else proves nothing"
    return in_range, grown


def _model(vocab_size: int) -> LlamaForCausalLM:
    with nnx.use_eager_sharding(False):  # as init_model builds it
        return LlamaForCausalLM(tiny_config(vocab_size=vocab_size), rngs=nnx.Rngs(0))


def test_filler_id_is_the_pad_where_the_vocabulary_has_it_else_0():
    assert filler_id(5, tiny_config(vocab_size=10)) == 5
    assert [filler_id(pad, tiny_config(vocab_size=10)) for pad in (10, 11, -1, None)] == [0, 0, 0, 0]
    assert filler_id(12, None) == 12, "no config: nothing is checked, the pad is kept"


@pytest.mark.parametrize("trainer_class", [SFTTrainer, DPOTrainer])
def test_a_pad_past_the_vocabulary_trains_with_the_loss_an_in_range_pad_gives(tmp_path, tokenizer_dir, trainer_class):
    in_range, grown = _tokenizers(tokenizer_dir)
    if trainer_class is SFTTrainer:
        rows = [{"prompt": f"{i} plus {i} is", "completion": " " + "many " * (i % 5)} for i in range(16)]
    else:
        rows = [{"prompt": f"{i} plus {i} is", "chosen": " " + "many " * (i % 5), "rejected": " few"}
                for i in range(16)]
    losses = {}
    for name, tokenizer in (("in_range", in_range), ("grown", grown)):
        trainer = trainer_class(_args(tmp_path, name), tokenizer=tokenizer, model=_model(len(in_range)),
                                dataset_train=datasets.Dataset.from_list(rows))
        losses[name] = trainer.train()["loss"]
    np.testing.assert_allclose(losses["grown"], losses["in_range"], rtol=1e-6)


def test_a_real_token_equal_to_the_pad_past_the_vocabulary_is_still_refused(tmp_path, tokenizer_dir):
    in_range, grown = _tokenizers(tokenizer_dir)
    rows = [{"prompt": f"{i} plus {i} is", "completion": f" many{NEW_PAD if i == 3 else ''}"} for i in range(16)]
    trainer = SFTTrainer(_args(tmp_path, "run"), tokenizer=grown, model=_model(len(in_range)),
                         dataset_train=datasets.Dataset.from_list(rows))
    with pytest.raises(TokenRangeError, match=rf"field 'input_ids', row 3, .*token id {len(in_range)}"):
        trainer.prepare_datasets()
