"""Token ids outside the model's vocabulary are refused when the data is prepared, before any compute.

Inside the compiled step a negative id wraps around in the embedding gather (a wrong token, no warning) and an id
past the table embeds as NaN (the step is skipped as non-finite, or trains on NaN); the trainers' own token-id
fields are checked once, vectorised, so the user learns which field, row, value and vocabulary size, and the fix.
"""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import types

import datasets
import numpy as np
import pytest
from transformers import AutoTokenizer

from easytrain import BaseTrainer, TrainingArguments
from easytrain.data import DataError, tokenize_preference_dataset, tokenize_sft_dataset
from easytrain.data.token_range import TokenRangeError, check_token_ids, vocab_size_of
from easytrain.trainers.dpo import DPOArguments, DPOTrainer
from easytrain.trainers.sft import SFTTrainer
from model_configs import tiny_config

EXTRA = "<extra_token>"


def _args(tmp_path, **kwargs) -> TrainingArguments:
    return TrainingArguments(output_dir=str(tmp_path / "run"), max_steps=2, max_length=8, train_batch_size=4,
                             eval_batch_size=4, save_strategy="no", eval_strategy="no", save_pretrained_at_end=False,
                             report_to=["none"], **kwargs)


def _blocks(rows: int, bad: dict[int, tuple[int, int]] = {}) -> datasets.Dataset:
    """`rows` pre-tokenized blocks of 9 ids (max_length 8), `bad[row] = (position, id)` written in."""
    ids = np.arange(rows * 9).reshape(rows, 9) % 50
    for row, (position, value) in bad.items():
        ids[row, position] = value
    return datasets.Dataset.from_dict({"input_ids": ids.tolist()})


def _model(vocab_size: int) -> types.SimpleNamespace:
    """What data preparation reads of a given model: its config (no weights needed to refuse the data)."""
    return types.SimpleNamespace(config=tiny_config(vocab_size=vocab_size))


@pytest.fixture
def grown_tokenizer(tokenizer_dir):
    """The test tokenizer with one token added past the model's vocabulary (`len(tokenizer) - 1` below)."""
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    tokenizer.add_tokens([EXTRA])
    return tokenizer


# ----------------------------------------------------------------------------- the check itself


def test_in_range_ids_pass_and_no_vocabulary_checks_nothing():
    rows = _blocks(4, {2: (3, -1)})
    check_token_ids(_blocks(4), ("input_ids",), 50, rows_are="rows")
    check_token_ids(rows, ("input_ids",), None, rows_are="rows")
    assert vocab_size_of(None) is None and vocab_size_of(tiny_config(vocab_size=77)) == 77


def test_the_first_bad_id_is_named_with_its_row_position_and_the_counts():
    rows = _blocks(6, {4: (2, 60), 5: (0, 70)})
    with pytest.raises(TokenRangeError, match=r"^Pre-tokenized rows hold token ids outside the model's vocabulary "
                                              r"\[0, 50\) \(vocab_size 50\): field 'input_ids', row 4, position 2 "
                                              r"holds token id 60 \(2 such ids, from 60 to 70 in all\)\..*"
                                              r"resize_token_embeddings") as info:
        check_token_ids(rows, ("input_ids",), 50, rows_are="Pre-tokenized rows")
    error = info.value
    assert isinstance(error, DataError)
    assert (error.field, error.row, error.position, error.token_id, error.vocab_size) == ("input_ids", 4, 2, 60, 50)


def test_a_negative_id_is_named_as_no_token_with_its_own_fix():
    with pytest.raises(TokenRangeError, match=r"row 1, position 8 holds token id -100.*Negative ids are not tokens.*"
                                              r"loss_mask"):
        check_token_ids(_blocks(3, {1: (8, -100)}), ("input_ids",), 50, rows_are="rows")


def test_rows_of_a_selection_are_named_by_their_position_in_it_and_unselected_rows_are_not_checked():
    rows = _blocks(8, {1: (0, -5), 6: (4, 99)})
    check_token_ids(rows.select([0, 2, 3, 4]), ("input_ids",), 50, rows_are="rows")  # the bad rows are not used
    with pytest.raises(TokenRangeError, match=r"row 2, position 4 holds token id 99") as info:
        check_token_ids(rows.select([0, 3, 6, 7]), ("input_ids",), 50, rows_are="rows")
    assert info.value.row == 2
    with pytest.raises(TokenRangeError, match=r"row 1, position 0 holds token id -5"):  # stored rows 0, 1, 7
        check_token_ids(rows.select([7, 6, 0, 1]).select([2, 3, 0]), ("input_ids",), 50, rows_are="rows")


def test_rows_stored_in_several_chunks_are_numbered_across_them():
    rows = datasets.concatenate_datasets([_blocks(3), _blocks(3), _blocks(2, {1: (5, 50)})])
    assert rows.data.column("input_ids").num_chunks == 3
    with pytest.raises(TokenRangeError, match=r"row 7, position 5 holds token id 50"):
        check_token_ids(rows, ("input_ids",), 50, rows_are="rows")


def test_every_named_field_is_checked_and_rows_of_other_lengths_are_located():
    rows = datasets.Dataset.from_dict({"chosen_input_ids": [[1, 2], [3], [4, 5, 6]],
                                       "rejected_input_ids": [[1], [2, 3, 4, 5], [7, 51, 8]]})
    check_token_ids(rows, ("chosen_input_ids",), 50, rows_are="pairs")
    with pytest.raises(TokenRangeError, match=r"field 'rejected_input_ids', row 2, position 1 holds token id 51"):
        check_token_ids(rows, ("chosen_input_ids", "rejected_input_ids"), 50, rows_are="pairs")


def test_the_tokenizer_names_the_token_behind_an_id_past_the_model(grown_tokenizer):
    vocab = len(grown_tokenizer) - 1
    rows = _blocks(2, {0: (1, vocab)})
    with pytest.raises(TokenRangeError, match=rf"holds token id {vocab} \(the tokenizer's '{EXTRA}'\)"):
        check_token_ids(rows, ("input_ids",), vocab, rows_are="rows", tokenizer=grown_tokenizer)


# ----------------------------------------------------------------------------- the trainers' data paths


def test_language_model_pretokenized_training_rows_are_refused_with_the_split(tmp_path, tokenizer_dir):
    trainer = BaseTrainer(_args(tmp_path), tokenizer=tokenizer_dir, dataset_train=_blocks(8, {5: (3, -1)}))
    with pytest.raises(TokenRangeError, match=r"Pre-tokenized rows of the 'train' split.*field 'input_ids', row 5, "
                                              r"position 3 holds token id -1"):
        trainer.prepare_datasets()


def test_language_model_eval_rows_and_evaluate_dataset_are_refused(tmp_path, tokenizer_dir):
    trainer = BaseTrainer(_args(tmp_path), tokenizer=tokenizer_dir, model=_model(50), dataset_train=_blocks(8),
                          dataset_eval=_blocks(4, {2: (0, 50)}))
    with pytest.raises(TokenRangeError, match=r"the 'validation' split.*vocab_size 50.*row 2, position 0 holds "
                                              r"token id 50"):
        trainer.prepare_datasets()
    trainer = BaseTrainer(_args(tmp_path), tokenizer=tokenizer_dir, model=_model(50), dataset_train=_blocks(8))
    trainer.prepare_datasets()
    with pytest.raises(TokenRangeError, match=r"evaluate\(dataset\).*row 1, position 7 holds token id 64"):
        trainer.prepare_eval_dataset(_blocks(3, {1: (7, 64)}))


def test_language_model_text_tokenized_past_a_given_model_is_refused(tmp_path, grown_tokenizer, text_lines):
    vocab = len(grown_tokenizer) - 1
    text = [f"{line} {EXTRA}" for line in text_lines]
    trainer = BaseTrainer(_args(tmp_path), tokenizer=grown_tokenizer, model=_model(vocab),
                          dataset_train=datasets.Dataset.from_dict({"text": text}))
    with pytest.raises(TokenRangeError, match=rf"Token blocks of the 'train' split.*vocab_size {vocab}.*'input_ids'"
                                              rf".*token id {vocab} \(the tokenizer's '{EXTRA}'\)"):
        trainer.prepare_datasets()


def test_sft_examples_with_a_token_past_a_given_model_are_refused_by_example(tmp_path, grown_tokenizer):
    vocab = len(grown_tokenizer) - 1
    examples = [{"prompt": "1+1=", "completion": "2"}] * 6
    examples[4] = {"prompt": "1+1=", "completion": f"2 {EXTRA}"}
    trainer = SFTTrainer(_args(tmp_path, validation_split_percentage=0), tokenizer=grown_tokenizer,
                         model=_model(vocab), dataset_train=datasets.Dataset.from_list(examples))
    with pytest.raises(TokenRangeError, match=rf"SFT examples of the 'train' split hold .*field 'input_ids', row 4, "
                                              rf".*token id {vocab}"):
        trainer.prepare_datasets()
    trainer = SFTTrainer(_args(tmp_path), tokenizer=grown_tokenizer, model=_model(vocab),
                         dataset_train=datasets.Dataset.from_list(examples[:4]))
    trainer.prepare_datasets()
    with pytest.raises(TokenRangeError, match=r"SFT examples of the dataset given to evaluate\(dataset\) .*row 1"):
        trainer.prepare_eval_dataset(datasets.Dataset.from_list(examples[3:]))
    with pytest.raises(TokenRangeError, match=r"row 1"):
        tokenize_sft_dataset(datasets.Dataset.from_list(examples[3:]), grown_tokenizer, vocab_size=vocab)


def test_dpo_pairs_are_refused_by_field_before_reference_log_probs_are_computed(tmp_path, grown_tokenizer):
    vocab = len(grown_tokenizer) - 1
    pairs = [{"prompt": "1+1=", "chosen": "2", "rejected": "3"}] * 5
    pairs[3] = {"prompt": "1+1=", "chosen": "2", "rejected": f"3 {EXTRA}"}
    trainer = DPOTrainer(_args(tmp_path, validation_split_percentage=0), DPOArguments(precompute_ref_log_probs=True),
                         tokenizer=grown_tokenizer, model=_model(vocab),
                         dataset_train=datasets.Dataset.from_list(pairs))
    with pytest.raises(TokenRangeError, match=rf"Preference pairs of the 'train' split hold .*field "
                                              rf"'rejected_input_ids', row 3, .*token id {vocab}"):
        trainer.prepare_datasets()  # before any reference model is built: this one has no weights
    trainer = DPOTrainer(_args(tmp_path), tokenizer=grown_tokenizer, model=_model(vocab),
                         dataset_train=datasets.Dataset.from_list(pairs[:3]),
                         dataset_eval=datasets.Dataset.from_list(pairs))
    with pytest.raises(TokenRangeError, match=r"Preference pairs of the 'validation' split .*row 3"):
        trainer.prepare_datasets()
    trainer = DPOTrainer(_args(tmp_path, validation_split_percentage=0), tokenizer=grown_tokenizer,
                         model=_model(vocab), dataset_train=datasets.Dataset.from_list(pairs[:3]))
    trainer.prepare_datasets()
    with pytest.raises(TokenRangeError, match=r"Preference pairs of the dataset given to evaluate\(dataset\) .*row 3"):
        trainer.prepare_eval_dataset(datasets.Dataset.from_list(pairs))
    pairs[3] = {"prompt": f"1+1= {EXTRA}", "chosen": "2", "rejected": "3"}
    with pytest.raises(TokenRangeError, match=r"field 'chosen_input_ids', row 3"):
        tokenize_preference_dataset(datasets.Dataset.from_list(pairs), grown_tokenizer, vocab_size=vocab)


def test_a_trainer_with_its_own_rows_is_not_checked(tmp_path):
    """Rows a trainer's own `prepare_datasets` returns follow its layout: an integer field is not a token id."""

    class Labels(BaseTrainer):
        def prepare_datasets(self):
            self.model_config = tiny_config(vocab_size=4)
            rows = {"input_ids": np.full((8, 3), 9, np.int32), "label": np.full((8,), -1, np.int32)}
            return rows, None

    trainer = Labels(_args(tmp_path), model=_model(4))
    assert trainer.configure_dataloaders().total_steps == 2
