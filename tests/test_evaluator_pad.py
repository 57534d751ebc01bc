"""The generation evaluators pass the tokenizer's pad to `greedy_complete` only where the model has a row for it: a
pad added to the tokenizer after training sits at the model's vocab_size, which `generate` refuses as an explicit
pad (finished rows would feed it back), and both evaluators then failed where they used to complete the prompts.
The completions are decoded up to EOS, so the pad's id changes nothing in them."""

import numpy as np
import pytest

from easytrain import evaluators
from easytrain.models import init_model
from easytrain.tasks.arithmetic import build_arithmetic_tokenizer

from model_configs import tiny_config


class Trainer:
    def __init__(self, model):
        self.model = model


@pytest.fixture(scope="module")
def trained():
    """A tiny model sized to the tokenizer, and the tokenizer's own pad id."""
    tokenizer = build_arithmetic_tokenizer()
    return Trainer(init_model(tiny_config(vocab_size=len(tokenizer)), seed=0)), tokenizer.pad_token_id


def _tokenizer(pad_past_the_model: bool):
    tokenizer = build_arithmetic_tokenizer()
    if pad_past_the_model:
        vocab_size = len(tokenizer)
        tokenizer.add_special_tokens({"pad_token": "<added_pad>"})
        assert tokenizer.pad_token_id == vocab_size
    return tokenizer


@pytest.mark.parametrize("kind", ["exact_match", "completion_metrics"])
def test_a_tokenizer_pad_past_the_models_vocabulary_completes_as_its_own_pad_does(trained, kind):
    """Was: GenerationError: pad_token_id = 18 is outside the model's vocabulary [0, 18)."""
    trainer, _ = trained
    completions = []
    for pad_past_the_model in (False, True):
        tokenizer = _tokenizer(pad_past_the_model)
        if kind == "exact_match":
            metric = evaluators.ExactMatch(["1+1=", "12*3="], ["2", "36"], tokenizer, max_new_tokens=6)
        else:
            prompts = [tokenizer("1+1=")["input_ids"], tokenizer("12*3=")["input_ids"]]
            metric = evaluators.CompletionMetrics(prompts, ["2", "36"], tokenizer, max_new_tokens=6)
        completions.append(metric.completions(trainer))
    assert completions[0] == completions[1] and len(completions[1]) == 2


def test_the_tokenizers_pad_is_passed_where_the_model_has_it(trained, monkeypatch):
    """Finished rows emit the tokenizer's own pad where the model has it (the evaluators' behaviour before)."""
    trainer, pad = trained
    seen = []
    monkeypatch.setattr(evaluators, "greedy_complete",
                        lambda model, prompts, n, pad_id, eos_id=None: seen.append(pad_id) or np.zeros((1, n), int))
    evaluators.CompletionMetrics([[4, 5]], ["2"], _tokenizer(False), max_new_tokens=2).completions(trainer)
    evaluators.CompletionMetrics([[4, 5]], ["2"], _tokenizer(True), max_new_tokens=2).completions(trainer)
    assert seen == [pad, _tokenizer(False).eos_token_id]
