"""`ExactMatch` and `CompletionMetrics` pair prompt i with answer i: with more prompts than answers (or fewer) they
scored only the pairs that lined up, without a word. Refused when built, naming both lengths, so never after
training."""

import pytest

from easytrain.evaluators import CompletionMetrics, ExactMatch
from easytrain.tasks.arithmetic import build_arithmetic_tokenizer


@pytest.mark.parametrize("prompts, answers", [(["1+1=", "2+2=", "3+3="], ["2", "4"]), (["1+1="], ["2", "4"])])
def test_exact_match_refuses_prompts_and_answers_of_different_lengths(prompts, answers):
    with pytest.raises(ValueError, match=f"{len(prompts)} prompts.*{len(answers)} answers"):
        ExactMatch(prompts, answers, build_arithmetic_tokenizer())


def test_exact_match_takes_one_answer_per_prompt():
    assert len(ExactMatch(["1+1=", "2+2="], ["2", "4"], build_arithmetic_tokenizer()).answers) == 2


def test_completion_metrics_refuses_prompts_and_references_of_different_lengths():
    with pytest.raises(ValueError, match="3 prompts.*2 references"):
        CompletionMetrics([[1], [2], [3]], ["2", "4"], build_arithmetic_tokenizer())
