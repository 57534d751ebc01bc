"""Evaluators: extra metrics computed by `evaluate()`, each `trainer -> dict[str, float]`."""

from __future__ import annotations

import logging
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from easytrain.errors import ArgumentError
from easytrain.generation import GenerationError, greedy_complete

Evaluator = Callable[[Any], Mapping[str, float]]
logger = logging.getLogger("easytrain")


class ExactMatch:
    """Fraction of prompts whose greedy completion equals the expected answer (`exact_match`).

    Args:
        prompts / answers: strings, one answer per prompt (refused otherwise); the completion, decoded up to EOS,
            and the answer are compared stripped of surrounding whitespace (so " Paris", as a BPE vocabulary spells
            it after the prompt, matches "Paris").
        tokenizer: encodes prompts (each preceded by EOS, as documents are in training) and decodes.
        name: metric key, reported as `eval_<name>`.
    """

    #: It runs the trained module's init_cache()/decode(): decided at set-up (`usable_evaluators`).
    needs_generation = True

    def __init__(self, prompts: Sequence[str], answers: Sequence[str], tokenizer: Any, *,
                 name: str = "exact_match", max_new_tokens: int | None = None):
        self.prompts, self.answers, self.tokenizer, self.name = list(prompts), list(answers), tokenizer, name
        if len(self.prompts) != len(self.answers):  # zip would score only the pairs that line up, without a word
            raise ValueError(f"ExactMatch pairs prompt i with answer i, but got {len(self.prompts)} prompts and "
                             f"{len(self.answers)} answers: give one answer per prompt.")
        longest = max(len(tokenizer(a, add_special_tokens=False)["input_ids"]) for a in self.answers)
        self.max_new_tokens = max_new_tokens or longest + 1
        self._encoding: tuple[Any, tuple[str, ...], list[int], list[list[int]]] | None = None

    @property
    def metric_names(self) -> tuple[str, ...]:
        """What a call returns, known before it runs (checked against `metric_for_best_model` at set-up)."""
        return (f"eval_{self.name}",)

    def __call__(self, trainer: Any) -> dict[str, float]:
        return {f"eval_{self.name}": exact_match(self.completions(trainer), self.answers)}

    def completions(self, trainer: Any) -> list[str]:
        """The decoded greedy completion of every prompt; in a multi-process run, the same on every process."""
        rows = greedy_complete(trainer.model, self.encoded_prompts, self.max_new_tokens,
                               pad_id(self.tokenizer, trainer.model), self.tokenizer.eos_token_id)
        return [self._decode(row) for row in rows]

    @property
    def encoded_prompts(self) -> list[list[int]]:
        """Every prompt's ids after the context. Kept with what they were encoded from (the tokenizer, the prompts and
        the context): an evaluation encodes again only when one of those was changed since the last one (`prompts`
        edited or replaced between evaluations), never the same prompts at every evaluation."""
        prompts, context = tuple(self.prompts), self._context()
        kept = self._encoding
        if kept is None or kept[0] is not self.tokenizer or kept[1] != prompts or kept[2] != context:
            encoded = [context + self.tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
            self._encoding = kept = (self.tokenizer, prompts, context, encoded)
        return kept[3]

    def _context(self) -> list[int]:
        """Start each prompt as a document starts in training: right after an EOS separator."""
        start = self.tokenizer.eos_token_id
        if start is None:
            start = self.tokenizer.bos_token_id
        return [] if start is None else [start]

    def _decode(self, ids: np.ndarray) -> str:
        return _until_eos(ids, self.tokenizer)


class CompletionMetrics:
    """Greedy completions of tokenised prompts, scored by exact match and an optional user function.

    Args:
        prompts: token ids of each prompt, as training tokenised them (`easytrain.data.prompts`).
        references: the expected answer of each prompt.
        compute_metrics: `(predictions, references) -> {name: value}`, reported as `eval_<name>`; it gets the
            completions decoded up to EOS and the references, both stripped of surrounding whitespace, as
            `exact_match` compares them.
    """

    needs_generation = True

    def __init__(self, prompts: Sequence[Sequence[int]], references: Sequence[str], tokenizer: Any, *,
                 compute_metrics: Callable[[list[str], list[str]], Mapping[str, float]] | None = None,
                 max_new_tokens: int = 64):
        self.prompts, self.references, self.tokenizer = [list(p) for p in prompts], list(references), tokenizer
        self.compute_metrics, self.max_new_tokens = compute_metrics, max_new_tokens
        if len(self.prompts) != len(self.references):  # zip would score only the pairs that line up
            raise ValueError(f"CompletionMetrics pairs prompt i with reference i, but got {len(self.prompts)} prompts "
                             f"and {len(self.references)} references: give one reference per prompt.")

    @property
    def metric_names(self) -> tuple[str, ...] | None:
        """`eval_exact_match`, or None (not known before running) with a user `compute_metrics`."""
        return ("eval_exact_match",) if self.compute_metrics is None else None

    def __call__(self, trainer: Any) -> dict[str, float]:
        predictions, references = self.completions(trainer), [reference.strip() for reference in self.references]
        metrics = {"exact_match": exact_match(predictions, references)}
        if self.compute_metrics is not None:
            metrics.update(self.compute_metrics(predictions, references))
        return {f"eval_{name}": float(value) for name, value in metrics.items()}

    def completions(self, trainer: Any) -> list[str]:
        rows = greedy_complete(trainer.model, self.prompts, self.max_new_tokens, pad_id(self.tokenizer, trainer.model),
                               self.tokenizer.eos_token_id)
        return [_until_eos(row, self.tokenizer) for row in rows]


def exact_match(predictions: Sequence[str], references: Sequence[str]) -> float:
    """Share of predictions equal to their reference, both stripped of surrounding whitespace: what a completion
    decoded from tokens starts or ends with (the space a BPE word carries) is no part of the answer."""
    return float(np.mean([p.strip() == r.strip() for p, r in zip(predictions, references)]))


def pad_id(tokenizer: Any, model: Any) -> int:
    """What `greedy_complete` pads with: the tokenizer's pad where the model has a row for it, else `generate`'s
    default pad, the first EOS id (0 without one). Finished rows emit it and feed it back, so `generate` refuses a
    pad past the model's vocabulary (one added to the tokenizer after training); the completions are decoded up to
    EOS, so which id it is changes nothing in them."""
    pad, vocab_size = tokenizer.pad_token_id, getattr(getattr(model, "config", None), "vocab_size", None)
    if pad is not None and (not isinstance(vocab_size, int) or pad < vocab_size):
        return pad
    return tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0


def _until_eos(ids: np.ndarray, tokenizer: Any) -> str:
    ids = list(ids)
    if tokenizer.eos_token_id in ids:
        ids = ids[: ids.index(tokenizer.eos_token_id)]
    return tokenizer.decode(ids, skip_special_tokens=True).strip()


def arithmetic_exact_match(validation: Any, tokenizer: Any, limit: int = 256) -> ExactMatch:
    """Exact-match accuracy on held-out problems of the embedded arithmetic corpus."""
    from easytrain.tasks.arithmetic import split_problem

    pairs = [split_problem(text) for text in validation["text"][:limit]]
    return ExactMatch([p for p, _ in pairs], [a for _, a in pairs], tokenizer, name="exact_match")


def generation_problem(module: Any) -> str | None:
    """Why `module` cannot generate (what `easytrain.generation` refuses at its first call), or None."""
    if hasattr(module, "init_cache") and hasattr(module, "decode"):
        return None
    return f"{type(module).__name__} has no init_cache()/decode() to generate with"


def usable_evaluators(evaluators: Sequence[Evaluator], module: Any, *, added: Sequence[Evaluator],
                      asked: Sequence[str] | None) -> list[Evaluator]:
    """`evaluators` that can run on `module`, decided at set-up rather than at the first evaluation (which would
    lose the steps trained before it). One that generates (`needs_generation`) on a module that cannot is left out,
    with a warning, when the trainer's rows `added` it unasked (`eval_metrics` unset: `asked` None); asked for by
    `eval_metrics`, or passed as `evaluators=`, it is refused, naming its metric."""
    problem = generation_problem(module)
    if problem is None:
        return list(evaluators)
    kept = []
    for evaluator in evaluators:
        if not getattr(evaluator, "needs_generation", False):
            kept.append(evaluator)
            continue
        metric = _metric_label(evaluator)
        if not any(evaluator is default for default in added):
            raise GenerationError(f"the evaluator {type(evaluator).__name__} ({metric}) scores greedy generations, "
                                  f"and {problem}: remove it from evaluators=, or give the module init_cache() and "
                                  "decode() (as easytrain.models.LlamaForCausalLM has).")
        if asked is not None:
            rest = " ".join(name for name in asked if name not in metric.split(", ")) or "none"
            raise ArgumentError("eval_metrics", f"{metric} scores greedy generations, and {problem}; pass "
                                                f"--eval_metrics without {metric} (--eval_metrics {rest}).")
        logger.warning("%s is left out of evaluation: it scores greedy generations, and %s.", metric, problem)
    return kept


def _metric_label(evaluator: Any) -> str:
    """The metric names an evaluator reports, without the `eval_` prefix (its type's name when it does not say)."""
    names = getattr(evaluator, "metric_names", None)
    if not names:
        return "exact_match" if isinstance(evaluator, CompletionMetrics) else type(evaluator).__name__
    return ", ".join(name.removeprefix("eval_") for name in names)
