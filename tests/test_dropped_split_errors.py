"""When every example of a split is dropped, the error names the split and where its rows come from.

Without it, a validation set that lost every example reads "No example is left to train on", and the user
inspects training data that is fine.
"""

import datasets
import pytest
from chat_fixtures import build_chat_tokenizer

from easytrain import TrainingArguments
from easytrain.data import DataError
from easytrain.data.packing import pack_examples
from easytrain.data.preference_data import PreferenceDataOptions, tokenize_preference_dataset
from easytrain.data.row_errors import NoExampleLeftError
from easytrain.data.sft import SFTDataOptions, tokenize_sft_dataset
from easytrain.data.token_range import rows_of
from easytrain.trainers.sft import SFTArguments, SFTTrainer

CHAT = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}
NO_ANSWER = {"messages": [{"role": "user", "content": "hi"}]}


def trainer_error(tmp_path, train, evaluation) -> str:
    args = TrainingArguments(output_dir=str(tmp_path / "run"), model_config="tiny", max_length=32, train_batch_size=4,
                             max_steps=1, save_strategy="no", eval_strategy="no", report_to=["none"],
                             disable_progress_bar=True, save_pretrained_at_end=False)
    trainer = SFTTrainer(args, SFTArguments(assistant_only_loss=True), tokenizer=build_chat_tokenizer("chatml"),
                         dataset_train=datasets.Dataset.from_list(train),
                         dataset_eval=datasets.Dataset.from_list(evaluation))
    with pytest.raises(DataError) as info:
        trainer.prepare_datasets()
    return str(info.value)


def test_an_eval_split_that_loses_every_example_is_named(tmp_path):
    text = trainer_error(tmp_path, [CHAT] * 8, [NO_ANSWER] * 5)
    assert "'validation' split" in text and "dataset_eval" in text and "train on" not in text, text


def test_a_train_split_that_loses_every_example_is_named(tmp_path):
    text = trainer_error(tmp_path, [NO_ANSWER] * 8, [CHAT] * 2)
    assert "'train' split" in text and "dataset_train" in text, text


def test_the_data_functions_raise_an_error_a_caller_can_name():
    tok = build_chat_tokenizer("chatml")
    cases = [lambda: tokenize_sft_dataset(datasets.Dataset.from_list([NO_ANSWER]), tok,
                                          SFTDataOptions(assistant_only_loss=True)),
             lambda: pack_examples({"input_ids": [[1, 2]], "loss_mask": [[1, 0]]}, 8),
             lambda: tokenize_preference_dataset(
                 datasets.Dataset.from_list([{"prompt": "a", "chosen": "", "rejected": "b"}]), tok,
                 PreferenceDataOptions(add_eos=False))]
    for case in cases:
        with pytest.raises(NoExampleLeftError) as info:
            with rows_of("validation"):
                case()
        assert "the 'validation' split" in str(info.value) and "validation_file" in str(info.value), str(info.value)
