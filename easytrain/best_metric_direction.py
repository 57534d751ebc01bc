"""The direction that ranks evaluations (`greater_is_better` for `metric_for_best_model`): inferred from the metric's
name where unset, recorded as inferred so that `arguments.json` saves it unset (a rerun with another metric infers that
metric's direction, where a saved `false` for eval_loss ranked an accuracy backwards), and a given direction against a
plain name warned about.
"""

from __future__ import annotations

import functools
import logging
import re
from typing import Any

logger = logging.getLogger("easytrain")

#: Metric names for which a lower value is better: a loss or a perplexity however the name ends in it
#: (`eval_logloss`, as transformers reads it; `eval_word_perplexity`, as lm-evaluation-harness names it), and the last
#: word or words of a name (`eval_top1_error`, `eval_char_error_rate`; not `eval_answer`, `eval_kl_coverage` nor
#: `eval_ce_accuracy`) in `LOWER_WORDS`, as evaluate, torchmetrics and lm-evaluation-harness name their lower-is-better
#: metrics. Any other metric is ranked higher-is-better (transformers: only names ending in `loss`), with a warning
#: unless a word of its name is in `HIGHER_IS_BETTER`.
LOSS_ENDINGS = ("loss", "perplexity")
LOWER_WORDS = (
    "ppl", "nll", "negative_log_likelihood",  # a perplexity, a negative log-likelihood
    "cross_entropy", "xent", "ce",  # a cross-entropy (a loss by another name)
    "bpb", "bpc", "bits_per_byte", "bits_per_token", "bits_per_character", "bits_per_char",  # a code length
    "bpd", "bits_per_dim", "bits_per_dimension",  # a code length per pixel or dimension (image likelihood models)
    "mse", "mae", "rmse", "msle", "rmsle", "mape", "smape", "brier_score",  # a regression or calibration error
    "mad", "huber",  # a mean absolute deviation, a Huber error
    "error", "error_rate", "wer", "cer", "mer", "wil", "ter",  # an error, edit or word-information-lost rate
    "distance", "divergence", "kl", "kld", "jsd",  # a distance (edit, Hamming, ...) or a divergence (KL, JS)
    "fid", "kid",  # the Frechet and kernel inception distances of generated images
)
LOWER_IS_BETTER = LOSS_ENDINGS + LOWER_WORDS
#: Words of metric names for which a higher value is plainly better, as metric libraries spell them (`rouge1`,
#: `rougeL`, `f1_macro`, `rewards/accuracies`): inferred without a warning; an explicit False for the first two is
#: warned about.
HIGHER_IS_BETTER = ("accuracy", "exact_match", "accuracies", "f1", "bleu", "rouge", "auc", "precision", "recall")
_WORD_END = r"(?:$|[_/.\-])"


def ends_in(metric: str, words: tuple[str, ...]) -> bool:
    """Whether `metric`'s last word (after `_`, `/`, `.` or `-`), or last words for a phrase such as
    `bits_per_byte`, is one of `words`."""
    return re.search(rf"(?:^|[_/.\-])(?:{'|'.join(map(re.escape, words))})$", metric) is not None


def lower_is_better(metric: str) -> bool:
    """Whether `metric` is a loss, a perplexity, an error measure, a distance or a divergence by its name
    (`LOSS_ENDINGS`, `LOWER_WORDS`)."""
    return metric.endswith(LOSS_ENDINGS) or ends_in(metric, LOWER_WORDS)


def names_a(metric: str, words: tuple[str, ...]) -> bool:
    """Whether a word of `metric` is one of `words`, or one of them followed by digits or a capital (`rouge1`,
    `rougeL`)."""
    pattern = rf"(?:^|[_/.\-])(?:{'|'.join(map(re.escape, words))})(?:\d+|[A-Z]\w*)?{_WORD_END}"
    return re.search(pattern, metric) is not None


#: The instance attribute recording the direction `resolve_best_metric` inferred (not a field: never saved).
_INFERRED_DIRECTION = "_inferred_greater_is_better"


def resolve_best_metric(args: Any) -> None:
    """Resolve, once and in place, what ranks evaluations: a bare `metric_for_best_model` ('accuracy') gets the
    `eval_` prefix every evaluation metric carries, and an unset `greater_is_better` follows the metric's name (lower
    is better for a loss, a perplexity, an error, a distance or a divergence: `lower_is_better`; higher otherwise),
    so early stopping, checkpoint retention and `load_best_model_at_end` all rank by one direction. An inferred
    direction is recorded as such, so that `saved_values` writes it unset: a rerun with another metric infers that
    metric's direction."""
    metric = args.metric_for_best_model
    if isinstance(metric, str) and metric and not metric.startswith("eval_"):
        args.metric_for_best_model = metric = f"eval_{metric}"
        logger.info("metric_for_best_model: ranking by %r (evaluation metrics carry the eval_ prefix)", metric)
    if args.greater_is_better is None:
        ranked = metric or "eval_loss"  # early stopping watches eval_loss when no metric is named
        args.greater_is_better = not lower_is_better(ranked)
        setattr(args, _INFERRED_DIRECTION, args.greater_is_better)
        if metric is not None or args.early_stopping_patience is not None:
            _log_inferred_direction(ranked, args.greater_is_better)
    elif metric is not None or args.early_stopping_patience is not None:
        _warn_contradicted_direction(metric or "eval_loss", args.greater_is_better)


def direction_inferred(args: Any) -> bool:
    """Whether `greater_is_better` holds the direction `resolve_best_metric` inferred (not one given, nor one set
    on the instance since)."""
    inferred = getattr(args, _INFERRED_DIRECTION, None)
    return inferred is not None and inferred == args.greater_is_better


def saved_values(args: Any) -> dict[str, Any]:
    """The arguments as a file records them to be read again: `to_dict()`, with an inferred `greater_is_better` unset
    (null). Saved resolved, it would read back as given and rank another `metric_for_best_model` backwards."""
    values = args.to_dict()
    if direction_inferred(args):
        values["greater_is_better"] = None
    return values


def _log_inferred_direction(metric: str, greater_is_better: bool) -> None:
    """Say which direction a name gave: a warning (once per process: arguments are checked again when copied) for
    a name of no known direction, ranked higher-is-better by default."""
    if lower_is_better(metric) or names_a(metric, HIGHER_IS_BETTER):
        logger.info("greater_is_better=%s inferred for %r (lower is better for a name ending in a loss, a perplexity, "
                    "an error, a distance or a divergence: %s); set --greater_is_better to choose", greater_is_better,
                    metric, ", ".join(LOWER_IS_BETTER))
    else:
        _warn_unknown_direction(metric, greater_is_better)


@functools.cache
def _warn_unknown_direction(metric: str, greater_is_better: bool) -> None:
    logger.warning("greater_is_better=%s inferred for %r, a name of no known direction, ranked higher-is-better: if "
                   "lower is better, as for an error or a distance, the best checkpoint kept would be the worst. Set "
                   "--greater_is_better to choose.", greater_is_better, metric)


@functools.cache
def _warn_contradicted_direction(metric: str, greater_is_better: bool) -> None:
    """A given direction against what the metric's name plainly says (a loss ranked higher-is-better, an accuracy
    lower-is-better): kept, as given, but warned about once per process (a stale value in a reused config file)."""
    if lower_is_better(metric) and greater_is_better:
        implied = False
    elif ends_in(metric, ("accuracy", "exact_match")) and not greater_is_better:
        implied = True
    else:
        return
    logger.warning("greater_is_better=%s ranks %r %s is better, against its name: checkpoints and early stopping "
                   "will prefer its %s values. Pass --greater_is_better %s (or none, to follow the name) if that is "
                   "not meant.", greater_is_better, metric, "higher" if greater_is_better else "lower",
                   "largest" if greater_is_better else "smallest", str(implied).lower())


def direction_change(stored: dict[str, Any], current: dict[str, Any]) -> str | None:
    """The warning for a resume that ranks the checkpoint's `metric_for_best_model` the other way (`arguments` as
    run_info records them, the direction resolved): retention re-ranks the kept checkpoints by this run's direction,
    so the checkpoint kept as best so far may go at the next save. A direction inferred from the name changes so
    when easytrain's inference does (`LOWER_WORDS` grew: ppl, nll, a distance, a divergence), not only when given."""
    metric = current.get("metric_for_best_model")
    before, now = stored.get("greater_is_better"), current.get("greater_is_better")
    if not metric or stored.get("metric_for_best_model") != metric or None in (before, now) or before == now:
        return None
    return (f"greater_is_better: the checkpoint's run ranked {metric!r} {'higher' if before else 'lower'}-is-better "
            f"(greater_is_better={before}), this run ranks it {'higher' if now else 'lower'}-is-better ({now}; "
            "inferred from the name where unset: docs/metrics.md lists the names read as lower-is-better, ppl, nll, "
            "bits_per_byte, a distance or a divergence among them). Checkpoint retention and load_best_model_at_end "
            "re-rank every kept checkpoint by this run's direction, so the one kept as best so far may be removed at "
            "the next save. Pass "
            f"--greater_is_better {str(before).lower()} to rank as before.")
