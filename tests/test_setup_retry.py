"""A setup that failed once (a transient error in `configure_model`) and is tried again on the same trainer starts
from the evaluators the user passed: those the first attempt's data preparation added are not taken for the user's.
The retry refused the default exact_match as if passed (`GenerationError ... evaluators=`) on a module that cannot
generate, and an SFT trainer ran its completion metrics twice every evaluation."""

from easytrain.evaluators import ExactMatch
from easytrain.trainers.sft import SFTTrainer
from runs import args_for
from test_default_evaluators import tiny
from test_evaluators_configure_model import OwnModelTrainer


class FailsOnce:
    """`configure_model` raises OSError at its first call (weights not mounted yet), then builds as usual."""

    tries = 0

    def configure_model(self):
        self.tries += 1
        if self.tries == 1:
            raise OSError("transient: weights share not mounted yet")
        return super().configure_model()


class FlakyOwnModel(FailsOnce, OwnModelTrainer):
    pass


class FlakySFT(FailsOnce, SFTTrainer):
    pass


def test_a_retried_setup_leaves_out_the_default_exact_match_again_not_refusing_it(tmp_path):
    trainer = FlakyOwnModel(tiny(tmp_path))
    try:
        trainer.train()
    except OSError:
        pass
    trainer.train()  # the default exact_match is left out on the reward model, as at a first setup
    assert trainer.steps_seen == 2
    assert not any(isinstance(evaluator, ExactMatch) for evaluator in trainer.evaluators)


def test_a_retried_sft_setup_has_its_completion_metrics_once(tmp_path):
    trainer = FlakySFT(args_for(tmp_path, max_steps=1))
    try:
        trainer.setup()
    except OSError:
        pass
    trainer.setup()
    assert [type(evaluator).__name__ for evaluator in trainer.evaluators] == ["CompletionMetrics"]


def test_a_retried_setup_keeps_the_evaluators_passed(tmp_path):
    from easytrain.tasks.arithmetic import build_arithmetic_chat_tokenizer

    given = ExactMatch(["1+1="], ["2"], build_arithmetic_chat_tokenizer(), name="sums")
    trainer = FlakySFT(args_for(tmp_path, max_steps=1), evaluators=[given])
    try:
        trainer.setup()
    except OSError:
        pass
    trainer.setup()
    assert trainer.evaluators[0] is given
    assert [type(evaluator).__name__ for evaluator in trainer.evaluators] == ["ExactMatch", "CompletionMetrics"]


def test_evaluators_the_user_changed_after_a_failed_setup_count_on_the_retry(tmp_path):
    """The list as the user left it after the failure is what the retry starts from: one appended is kept, one
    removed as the refusal says stays removed (a snapshot from the first attempt undid both)."""
    from easytrain.tasks.arithmetic import build_arithmetic_chat_tokenizer

    trainer = FlakySFT(args_for(tmp_path, max_steps=1))
    try:
        trainer.setup()
    except OSError:
        pass
    added = ExactMatch(["1+1="], ["2"], build_arithmetic_chat_tokenizer(), name="sums")
    trainer.evaluators.append(added)
    trainer.setup()
    assert [type(evaluator).__name__ for evaluator in trainer.evaluators] == ["ExactMatch", "CompletionMetrics"]
    assert trainer.evaluators[0] is added


def test_an_evaluator_removed_as_the_refusal_says_stays_removed_on_the_retry(tmp_path):
    import pytest

    from easytrain.generation import GenerationError
    from easytrain.tasks.arithmetic import build_arithmetic_tokenizer

    given = ExactMatch(["1+1="], ["2"], build_arithmetic_tokenizer(), name="sums")
    trainer = OwnModelTrainer(tiny(tmp_path), evaluators=[given])
    with pytest.raises(GenerationError, match="evaluators="):
        trainer.setup()
    trainer.evaluators.remove(given)
    trainer.setup()
    assert not any(evaluator is given for evaluator in trainer.evaluators)
