"""What a trainer is given as examples: `evaluate(dataset)` and `dataset_train=` take a `datasets.Dataset` (any
format set on it is dropped: rows are read as plain Python values), and anything else is refused naming the
argument and the fix, before any compute."""

import datasets
import numpy as np
import pytest

from chat_fixtures import build_chat_tokenizer
from easytrain import BaseTrainer, TrainingArguments
from easytrain.data import DataError
from easytrain.trainers import builders
from easytrain.trainers.sft import SFTArguments, SFTTrainer

CHATS = datasets.Dataset.from_list([{"messages": [{"role": "user", "content": f"what is {i} plus {i}?"},
                                                  {"role": "assistant", "content": f"it is {2 * i}"}]}
                                    for i in range(24)])
TEXTS = datasets.Dataset.from_dict({"text": [f"the quick brown fox number {i} jumps over the lazy dog"
                                             for i in range(48)]})
FORMATS = ["numpy", "pandas", "arrow", "torch"]


def _args(path, **overrides) -> TrainingArguments:
    values = dict(output_dir=str(path), model_config="tiny", max_length=16, train_batch_size=4, eval_batch_size=4,
                  max_steps=1, eval_strategy="no", save_strategy="no", report_to=["none"], disable_progress_bar=True,
                  save_pretrained_at_end=False)
    values.update(overrides)
    return TrainingArguments(**values)


@pytest.fixture(scope="module")
def sft_trainer(tmp_path_factory):
    return SFTTrainer(_args(tmp_path_factory.mktemp("sft")), tokenizer=build_chat_tokenizer("chatml"),
                      dataset_train=CHATS)


@pytest.fixture(scope="module")
def lm_trainer(tmp_path_factory, tokenizer):
    return BaseTrainer(_args(tmp_path_factory.mktemp("lm"), max_length=8), tokenizer=tokenizer,
                       dataset_train=TEXTS)


WRONG_EVALUATION_SETS = [
    (lambda rows: datasets.DatasetDict(validation=rows),
     r"`evaluate\(dataset\)` takes one split, got a DatasetDict with splits \['validation'\]; pass one, e.g. "
     r"evaluate\(splits\['validation'\]\)"),
    (lambda rows: rows.to_list(), r"`evaluate\(dataset\)` takes a datasets\.Dataset, got list; .*"
                                  r"datasets\.Dataset\.from_list\(rows\)"),
    (lambda rows: rows.to_iterable_dataset(), r"`evaluate\(dataset\)` is streamed \(IterableDataset\), which is "
                                              r"not accepted: .*streaming=True"),
]


@pytest.mark.parametrize(("wrong", "match"), WRONG_EVALUATION_SETS)
def test_sft_evaluate_refuses_what_is_not_one_dataset(sft_trainer, wrong, match):
    with pytest.raises(DataError, match=match):
        sft_trainer.evaluate(wrong(CHATS))


@pytest.mark.parametrize(("wrong", "match"), WRONG_EVALUATION_SETS)
def test_language_model_evaluate_refuses_what_is_not_one_dataset(lm_trainer, wrong, match):
    with pytest.raises(DataError, match=match):
        lm_trainer.evaluate(wrong(TEXTS))


@pytest.mark.parametrize("data_format", FORMATS)
def test_sft_evaluate_reads_a_formatted_dataset_as_plain_rows(sft_trainer, data_format):
    plain = sft_trainer.evaluate(CHATS.select(range(8)))
    assert sft_trainer.evaluate(CHATS.select(range(8)).with_format(data_format)) == plain


@pytest.mark.parametrize("data_format", FORMATS)
def test_language_model_evaluate_reads_a_formatted_dataset_as_plain_rows(lm_trainer, data_format):
    plain = lm_trainer.evaluate(TEXTS.select(range(8)))
    assert lm_trainer.evaluate(TEXTS.select(range(8)).with_format(data_format)) == plain


@pytest.mark.parametrize("data_format", FORMATS)
def test_sft_training_rows_from_a_formatted_dataset_are_the_plain_ones(tmp_path, data_format):
    def rows(dataset):
        trainer = SFTTrainer(_args(tmp_path / data_format), tokenizer=build_chat_tokenizer("chatml"),
                             dataset_train=dataset)
        train, _ = trainer.prepare_datasets()
        return train.with_format("numpy")[:]

    plain, formatted = rows(CHATS), rows(CHATS.with_format(data_format))
    assert plain.keys() == formatted.keys()
    for key in plain:
        np.testing.assert_array_equal(np.asarray(formatted[key]), np.asarray(plain[key]), err_msg=key)


@pytest.mark.parametrize(("wrong", "match"), [
    (CHATS.to_list(), r"`dataset` must be a datasets\.Dataset or datasets\.DatasetDict, got list \(the training "
                      r"data: `dataset_train` of a trainer\); build one with datasets\.Dataset\.from_list\(rows\)"),
    (CHATS.to_iterable_dataset(), r"`dataset` \(the training data: `dataset_train` of a trainer\) is streamed "
                                  r"\(IterableDataset\), which is not accepted"),
])
def test_a_training_set_that_is_not_a_dataset_names_dataset_train(tmp_path, wrong, match):
    with pytest.raises(DataError, match=match):
        SFTTrainer(_args(tmp_path), tokenizer=build_chat_tokenizer("chatml"), dataset_train=wrong).prepare_datasets()


def test_an_eval_set_that_is_not_a_dataset_names_dataset_eval(tmp_path):
    with pytest.raises(DataError, match=r"`dataset_eval` must be a datasets\.Dataset, got list"):
        SFTTrainer(_args(tmp_path), tokenizer=build_chat_tokenizer("chatml"), dataset_train=CHATS,
                   dataset_eval=CHATS.to_list()).prepare_datasets()


class _OwnHook:
    """A trainer whose `prepare_eval_dataset` of its own takes whatever it is given."""

    class arguments:
        disable_progress_bar = True

    def prepare_eval_dataset(self, dataset):
        return dataset


def test_a_hook_of_ones_own_gets_lists_and_columns_but_never_splits_or_streams():
    """The hooks of one's own make rows of lists or dicts of columns; no hook can batch a set of splits or a
    stream, refused before the hook is called."""
    trainer = _OwnHook()
    columns = {"x": np.ones((4, 2), np.float32)}
    assert builders.prepared_eval_rows(trainer, columns) is columns
    assert builders.prepared_eval_rows(trainer, [{"x": 1}]) == [{"x": 1}]
    assert builders.prepared_eval_rows(trainer, TEXTS.with_format("numpy")).format["type"] is None
    for wrong, match in WRONG_EVALUATION_SETS[::2]:
        with pytest.raises(DataError, match=match):
            builders.prepared_eval_rows(trainer, wrong(TEXTS))


@pytest.mark.parametrize(("overrides", "samples_fix"), [({}, False), ({"max_train_samples": 40}, True)])
def test_packing_too_few_rows_for_one_batch_names_the_examples_and_the_fixes(tmp_path, overrides, samples_fix):
    """40 short chats packed into max_length-256 rows make 3 rows: a batch of 8 cannot be filled, and the
    error says so in terms of the examples the user gave, not only of the rows packing made."""
    chats = datasets.Dataset.from_list([{"messages": [{"role": "user", "content": "hi"},
                                                      {"role": "assistant", "content": "hello"}]}] * 40)
    trainer = SFTTrainer(_args(tmp_path, max_length=256, train_batch_size=8, **overrides), SFTArguments(packing=True),
                         tokenizer=build_chat_tokenizer("chatml"), dataset_train=chats)
    with pytest.raises(DataError) as caught:
        trainer.prepare_datasets()
    message = str(caught.value)
    assert message.startswith("Packing put the 38 training examples (")
    assert "into 3 rows of max_length 256 tokens, but one global batch needs 8 rows (`train_batch_size`)" in message
    assert "Lower `max_length`" in message and "set `packing` off" in message
    assert "lower `train_batch_size`" in message and "add data" in message
    assert ("`max_train_samples`" in message) == samples_fix


@pytest.mark.parametrize("data_format", FORMATS)
def test_sft_eval_rows_from_a_formatted_dataset_eval_are_the_plain_ones(tmp_path, data_format):
    def rows(dataset):
        trainer = SFTTrainer(_args(tmp_path / data_format), tokenizer=build_chat_tokenizer("chatml"),
                             dataset_train=CHATS, dataset_eval=dataset)
        _, evaluation = trainer.prepare_datasets()
        return evaluation.with_format("numpy")[:]

    plain, formatted = rows(CHATS.select(range(8))), rows(CHATS.select(range(8)).with_format(data_format))
    assert plain.keys() == formatted.keys()
    for key in plain:
        np.testing.assert_array_equal(np.asarray(formatted[key]), np.asarray(plain[key]), err_msg=key)
