"""`ExactMatch` and `CompletionMetrics` compare a completion and its answer the same way: both stripped of surrounding
whitespace (the completion is decoded up to EOS and stripped). An answer written with a leading space (" Paris", as
BPE vocabularies spell a word after the prompt) counted as wrong even when generated exactly, lowering
`eval_exact_match` and the best checkpoint chosen by it; a user's `compute_metrics` got stripped predictions beside
unstripped references."""

import numpy as np
import pytest

import easytrain.evaluators as evaluators
from easytrain.tasks.arithmetic import build_arithmetic_tokenizer

ANSWERS = ["42", " 42", "42 ", "  7 "]


class Trainer:
    model = None


@pytest.fixture
def tokenizer():
    return build_arithmetic_tokenizer()


@pytest.fixture
def generates_exactly(monkeypatch, tokenizer):
    """A stand-in for the model whose greedy completion of prompt i is exactly `texts[i]`, then EOS, then padding."""

    def install(texts):
        def greedy_complete(model, prompts, max_new_tokens, pad_id, eos_id=None):
            rows = [tokenizer(text, add_special_tokens=False)["input_ids"] + [eos_id] for text in texts]
            return np.array([(row + [pad_id] * max_new_tokens)[:max_new_tokens] for row in rows])

        monkeypatch.setattr(evaluators, "greedy_complete", greedy_complete)

    return install


def test_exact_match_counts_an_answer_generated_exactly_whatever_its_surrounding_whitespace(tokenizer,
                                                                                          generates_exactly):
    generates_exactly(ANSWERS)
    metric = evaluators.ExactMatch(["1+1="] * len(ANSWERS), ANSWERS, tokenizer)
    assert metric(Trainer()) == {"eval_exact_match": 1.0}


def test_exact_match_and_completion_metrics_agree(tokenizer, generates_exactly):
    generates_exactly(["42", "7", " 8", "9"])
    expected = ["42", " 7 ", "8", "10"]
    exact = evaluators.ExactMatch(["1+1="] * 4, expected, tokenizer)(Trainer())["eval_exact_match"]
    completion = evaluators.CompletionMetrics([[1, 2]] * 4, expected, tokenizer, max_new_tokens=8)(Trainer())
    assert exact == completion["eval_exact_match"] == 0.75


def test_compute_metrics_gets_predictions_and_references_both_stripped(tokenizer, generates_exactly):
    generates_exactly([" 42", "7 "])
    seen = {}

    def user_exact(predictions, references):
        seen.update(predictions=predictions, references=references)
        return {"my_exact": float(np.mean([p == r for p, r in zip(predictions, references)]))}

    metric = evaluators.CompletionMetrics([[1, 2], [1, 3]], [" 42", "7 "], tokenizer, compute_metrics=user_exact,
                                          max_new_tokens=8)
    assert metric(Trainer()) == {"eval_exact_match": 1.0, "eval_my_exact": 1.0}
    assert seen == {"predictions": ["42", "7"], "references": ["42", "7"]}


@pytest.mark.parametrize("without_eos", [False, True])
def test_exact_match_prompts_start_as_training_documents_do(tokenizer, monkeypatch, without_eos):
    """Training sees each document right after an EOS separator, so the prompt starts with one (the BOS where the
    tokenizer has no EOS): without it the model completes a prompt unlike anything it was trained on."""
    if without_eos:
        tokenizer.eos_token = None
    seen = []

    def greedy_complete(model, prompts, max_new_tokens, pad_id, eos_id=None):
        seen.extend(prompts)
        return np.full((len(prompts), max_new_tokens), pad_id)

    monkeypatch.setattr(evaluators, "greedy_complete", greedy_complete)
    evaluators.ExactMatch(["1+1=", "3*4="], ["2", "12"], tokenizer)(Trainer())
    start = tokenizer.bos_token_id if without_eos else tokenizer.eos_token_id
    assert start is not None
    assert seen == [[start, *tokenizer(p, add_special_tokens=False)["input_ids"]] for p in ["1+1=", "3*4="]]
