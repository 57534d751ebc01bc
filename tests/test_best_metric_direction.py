"""The direction of `metric_for_best_model`: left unset, `greater_is_better` follows the metric's name (lower is
better for a loss, a perplexity, an error, a distance or a divergence, higher otherwise), resolved when the arguments
are checked and used by early stopping, checkpoint ranking and `load_best_model_at_end` alike; a bare metric name gets
its `eval_` prefix."""

from __future__ import annotations

import json
import logging

import pytest

from easytrain import ArgumentError, BaseTrainer
from easytrain.callbacks import EarlyStopping
from easytrain.trainers import builders
from metric_direction_arguments import arguments


@pytest.mark.parametrize(("metric", "expected"), [("eval_accuracy", True), ("eval_top2_accuracy", True),
                                                  ("eval_exact_match", True), ("eval_loss", False),
                                                  ("eval_perplexity", False), ("eval_chosen_loss", False),
                                                  ("eval_mse", False), ("eval_mae", False), ("eval_rmse", False),
                                                  ("eval_top1_error", False), ("eval_wer", False), ("eval_cer", False),
                                                  ("eval_f1", True), ("eval_bleu", True), ("eval_exact_answer", True),
                                                  ("eval_power", True), ("eval_rougeL", True), ("eval_logloss", False),
                                                  ("eval_binary_logloss", False), ("eval_nllloss", False),
                                                  (None, False)])
def test_unset_direction_follows_the_metric_name(tmp_path, metric, expected) -> None:
    assert arguments(tmp_path, metric_for_best_model=metric).greater_is_better is expected


#: Lower-is-better names as metric libraries spell them (evaluate, torchmetrics, lm-evaluation-harness): a perplexity
#: however abbreviated, a negative log-likelihood, bits per byte / token / character, an error or edit rate, a
#: distance, a divergence. A word of such a name that is not its last (`kl_coverage`), or a name merely ending in
#: those letters (`eval_answer`, `eval_counter`), says nothing.
LOWER_NAMES = ["eval_ppl", "eval_word_perplexity", "eval_byte_perplexity", "eval_nll", "eval_chosen_nll",
               "eval_bpb", "eval_bits_per_byte", "eval_bits_per_token", "eval_bits_per_character", "eval_bpc",
               "eval_error_rate", "eval_char_error_rate", "eval_ter", "eval_mer", "eval_wil", "eval_edit_distance",
               "eval_levenshtein_distance", "eval_kl", "eval_kl_divergence", "eval_js_divergence", "eval_msle",
               "eval_mape", "eval_smape", "eval_brier_score", "eval_calibration_error", "eval_negative_log_likelihood",
               "eval_cross_entropy", "eval_xent", "eval_ce", "eval_token_ce", "eval_bpd", "eval_bits_per_dim",
               "eval_bits_per_dimension", "eval_jsd", "eval_js_divergence", "eval_fid", "eval_kid", "eval_mad",
               "eval_huber"]
HIGHER_NAMES = ["eval_answer", "eval_counter", "eval_f1", "rewards/accuracies", "eval_kl_coverage", "eval_pll_gain",
                "eval_log_likelihood", "eval_distance_covered", "eval_bits_saved", "eval_acc", "eval_chrf",
                "eval_nllb_bleu", "eval_error_free", "eval_pass_rate", "eval_ce_accuracy", "eval_confidence",
                "eval_fidelity", "eval_xent_reduction", "eval_madlad_bleu"]


@pytest.mark.parametrize(("metric", "expected"), [*((name, False) for name in LOWER_NAMES),
                                                  *((name, True) for name in HIGHER_NAMES)])
def test_common_lower_is_better_names_are_ranked_lower_is_better(tmp_path, metric, expected) -> None:
    """Ranked higher-is-better, `save_total_limit` with `load_best_model_at_end` would keep and load the worst
    checkpoint by `eval_ppl` or `eval_bits_per_byte`."""
    assert arguments(tmp_path, metric_for_best_model=metric).greater_is_better is expected


@pytest.mark.parametrize("explicit", [True, False])
def test_an_explicit_direction_is_kept(tmp_path, explicit) -> None:
    for metric in ("eval_accuracy", "eval_loss"):
        assert arguments(tmp_path, metric_for_best_model=metric, greater_is_better=explicit).greater_is_better \
            is explicit


def test_the_inferred_direction_is_logged(tmp_path, caplog) -> None:
    with caplog.at_level(logging.INFO, logger="easytrain"):
        arguments(tmp_path, metric_for_best_model="eval_accuracy")
    assert "greater_is_better=True" in caplog.text and "eval_accuracy" in caplog.text


def test_a_name_of_no_known_direction_is_warned_about(tmp_path, caplog) -> None:
    """An error metric of a name easytrain cannot place (eval_widget_spread) would be ranked higher-is-better and
    keep the worst checkpoint: the guess is a warning, naming the field to set; a known name's is only logged."""
    with caplog.at_level(logging.INFO, logger="easytrain"):
        assert arguments(tmp_path, metric_for_best_model="widget_spread").greater_is_better is True
        assert arguments(tmp_path, metric_for_best_model="eval_f1").greater_is_better is True
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warned) == 1 and "eval_widget_spread" in warned[0] and "--greater_is_better" in warned[0], warned


@pytest.mark.parametrize("metric", ["rouge1", "rougeL", "f1_macro", "rewards/accuracies"])
def test_higher_is_better_names_as_metric_libraries_spell_them_are_not_warned_about(tmp_path, caplog, metric) -> None:
    with caplog.at_level(logging.INFO, logger="easytrain"):
        assert arguments(tmp_path, metric_for_best_model=metric).greater_is_better is True
    assert not [r for r in caplog.records if r.levelno == logging.WARNING], caplog.text


def test_the_warning_of_an_unknown_name_comes_once_per_run(tmp_path, caplog) -> None:
    """arguments.json is written from a copy of the arguments (`rerun_arguments`), checked again: one warning."""
    from easytrain.trainers.run_dir import rerun_arguments

    with caplog.at_level(logging.WARNING, logger="easytrain"):
        rerun_arguments(arguments(tmp_path, metric_for_best_model="eval_widget_gap"))
    assert sum("eval_widget_gap" in r.getMessage() for r in caplog.records) == 1, caplog.text


def test_the_command_line_flag_sets_either_direction(tmp_path) -> None:
    from easytrain.config_io import parse_task_arguments

    command = ["--output_dir", str(tmp_path), "--metric_for_best_model", "eval_accuracy"]
    assert parse_task_arguments(command, (), "lm")[0].greater_is_better is True
    assert parse_task_arguments([*command, "--greater_is_better", "false"], (), "lm")[0].greater_is_better is False
    loss = ["--output_dir", str(tmp_path), "--metric_for_best_model", "eval_loss", "--greater_is_better", "true"]
    assert parse_task_arguments(loss, (), "lm")[0].greater_is_better is True


def test_early_stopping_and_checkpoint_ranking_get_the_resolved_direction(tmp_path) -> None:
    args = arguments(tmp_path, metric_for_best_model="eval_accuracy", early_stopping_patience=2)
    stopping = [c for c in builders.default_callbacks(args) if isinstance(c, EarlyStopping)]
    assert [c.greater_is_better for c in stopping] == [True]
    manager = builders.checkpoint_manager(args)
    try:
        assert manager.greater_is_better is True
    finally:
        manager.close()


def test_a_bare_metric_name_gets_its_eval_prefix(tmp_path, caplog) -> None:
    with caplog.at_level(logging.INFO, logger="easytrain"):
        args = arguments(tmp_path, metric_for_best_model="accuracy")
    assert args.metric_for_best_model == "eval_accuracy" and args.greater_is_better is True
    assert "eval_accuracy" in caplog.text


def test_count_metrics_are_not_offered_as_choices(tmp_path) -> None:
    with pytest.raises(ArgumentError) as refused:
        BaseTrainer(arguments(tmp_path, metric_for_best_model="eval_acuracy")).setup()
    message = str(refused.value)
    assert "eval_accuracy" in message and "eval_num_tokens" not in message, message


def test_load_best_model_at_end_picks_the_highest_accuracy(tmp_path) -> None:
    """The best checkpoint by eval_accuracy is the one with the largest value, not the smallest."""
    from easytrain.cli import run

    run(arguments(tmp_path, task="lm", max_steps=8, save_strategy="steps", save_steps=2, save_total_limit=None,
                  metric_for_best_model="eval_accuracy", load_best_model_at_end=True, report_to=["jsonl"],
                  max_train_samples=128, learning_rate=3e-3, seed=0))
    records = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    evals = {r["step"]: r["eval_accuracy"] for r in records if r["split"] == "eval"}
    assert len(set(evals.values())) > 1, evals  # the ranking is decided
    best = max(evals, key=lambda step: (evals[step], -step))
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["train_best_step"] == best, (results["train_best_step"], evals)


def test_a_checkpoint_ranked_the_old_way_resumes(tmp_path, caplog) -> None:
    """A run saved with greater_is_better=False for eval_accuracy (the old default) resumes with it unset: the
    resolved direction applies from there, and early stopping, whose counter was kept the other way, starts afresh."""
    common = dict(task="lm", save_strategy="steps", save_steps=2, save_total_limit=None,
                  metric_for_best_model="eval_accuracy", early_stopping_patience=5)
    BaseTrainer(arguments(tmp_path, greater_is_better=False, **common)).train()
    resumed = arguments(tmp_path, max_steps=4, resume_from_checkpoint="latest", **common)
    assert resumed.greater_is_better is True
    with caplog.at_level(logging.WARNING, logger="easytrain"):
        BaseTrainer(resumed).train()
    assert "early stopping starts afresh" in caplog.text
    assert sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit()) == [2, 4]
