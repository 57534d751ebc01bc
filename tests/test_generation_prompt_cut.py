"""Generation-eval prompts follow training's truncation: each is the prompt part of the example's truncated ids.

Without the cut, a validation prompt of thousands of tokens was generated from whole, past `max_length` and past the
model's positions, while the same row was truncated for the loss.
"""

import logging

import datasets
import pytest
from chat_fixtures import build_chat_tokenizer

from easytrain import TrainingArguments
from easytrain.data import DataError
from easytrain.data.prompts import prompt_and_reference, prompts_and_references
from easytrain.data.sft import SFTDataOptions, tokenize_example
from easytrain.evaluators import CompletionMetrics
from easytrain.trainers.sft import SFTArguments, SFTTrainer

LONG_PROMPT = "the quick brown fox " * 40


def chat(user, answer="Four."):
    return {"messages": [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]}


def completion(prompt, answer=" Four."):
    return {"prompt": prompt, "completion": answer}


@pytest.fixture(scope="module")
def llama3():
    return build_chat_tokenizer("llama3")  # renders a BOS, which a left cut keeps


@pytest.mark.parametrize("row,data_format", [(chat(LONG_PROMPT), "conversational"),
                                             (completion(LONG_PROMPT), "prompt_completion")])
def test_a_left_cut_prompt_is_the_prompt_part_of_the_truncated_training_ids(llama3, row, data_format):
    options = SFTDataOptions(max_length=33, truncation_side="left")
    full = tokenize_example(row, llama3, SFTDataOptions(max_length=None), data_format).input_ids
    uncut, _ = prompt_and_reference(row, llama3, data_format, SFTDataOptions(max_length=None))
    trained = tokenize_example(row, llama3, options, data_format).input_ids
    prompt, _ = prompt_and_reference(row, llama3, data_format, options)
    assert len(full) > 33 and len(trained) == 33
    assert trained[: len(prompt)] == prompt and len(trained) - len(prompt) == len(full) - len(uncut)
    assert prompt[0] == llama3.bos_token_id and prompt[1:] == uncut[len(uncut) - len(prompt) + 1:]


@pytest.mark.parametrize("side", ["right", "drop"])
def test_a_prompt_training_keeps_no_answer_of_is_skipped_and_counted(llama3, side, caplog):
    rows = datasets.Dataset.from_list([chat("What is two plus two?"), chat(LONG_PROMPT), chat("Thank you")])
    options = SFTDataOptions(max_length=33, truncation_side=side)
    with caplog.at_level(logging.WARNING, logger="easytrain"):
        prompts, references = prompts_and_references(rows, llama3, options=options)
    assert len(prompts) == 2 and references == ["Four.", "Four."]
    assert all(len(p) < 33 for p in prompts)
    assert any("1 of the 3" in r.getMessage() and "skipped" in r.getMessage() for r in caplog.records), caplog.text


@pytest.mark.parametrize("room", [0, 1])
def test_a_right_cut_keeps_the_prompt_only_while_an_answer_token_fits(llama3, room):
    """At `max_length` = the prompt's length, training keeps the prompt and no answer token: the prompt is skipped.
    One token more and training keeps the answer's first token: the prompt is kept whole."""
    row = chat("What is two plus two?")
    whole, _ = prompt_and_reference(row, llama3, "conversational", SFTDataOptions(max_length=None))
    options = SFTDataOptions(max_length=len(whole) + room, truncation_side="right")
    trained = tokenize_example(row, llama3, options, "conversational").input_ids
    assert trained[: len(whole)] == whole and len(trained) == len(whole) + room
    prompt, _ = prompt_and_reference(row, llama3, "conversational", options)
    assert prompt == (whole if room else [])


def test_a_short_prompt_is_unchanged(llama3):
    row = chat("What is two plus two?")
    cut, _ = prompt_and_reference(row, llama3, "conversational", SFTDataOptions(max_length=33, truncation_side="left"))
    whole, _ = prompt_and_reference(row, llama3, "conversational", SFTDataOptions(max_length=None))
    assert cut == whole


def test_when_every_prompt_is_skipped_the_error_names_the_settings(llama3):
    rows = datasets.Dataset.from_list([chat(LONG_PROMPT)] * 2)
    with pytest.raises(DataError) as info:
        prompts_and_references(rows, llama3, options=SFTDataOptions(max_length=33))
    text = str(info.value)
    assert "max_length" in text and "generation_eval_samples" in text and "truncation_side" in text, text


def test_the_trainer_generates_from_prompts_cut_to_max_length(tmp_path):
    tok = build_chat_tokenizer("chatml")
    train = datasets.Dataset.from_list([chat("hi", "yo")] * 8)
    evaluation = datasets.Dataset.from_list([chat(LONG_PROMPT * 10, "yo"), chat("hi", "yo")])
    args = TrainingArguments(output_dir=str(tmp_path / "run"), model_config="tiny", max_length=32, train_batch_size=4,
                             max_steps=1, eval_strategy="no", save_strategy="no", report_to=["none"],
                             disable_progress_bar=True, save_pretrained_at_end=False)
    trainer = SFTTrainer(args, SFTArguments(generation_eval_samples=2, max_new_tokens=4, truncation_side="left"),
                         tokenizer=tok, dataset_train=train, dataset_eval=evaluation)
    trainer.prepare_datasets()
    [metrics] = [e for e in trainer.evaluators if isinstance(e, CompletionMetrics)]
    assert len(metrics.prompts) == 2 and max(map(len, metrics.prompts)) <= 32, list(map(len, metrics.prompts))
