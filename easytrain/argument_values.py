"""The value checks `TrainingArguments` runs when it is built, once `argument_checks` has checked each field's type.

Choices, positive counts and sizes, and the settings that must fit together (accumulation dividing the batch, the
best-model settings, LoRA, XLA options), each failing before any compute with the field and the fix; and, first,
the run's length (`resolve_run_length`: which of max_steps and num_train_epochs decides, as in transformers).
"""

from __future__ import annotations

import functools
import logging
import math
from typing import TYPE_CHECKING

from easytrain import argument_checks, argument_settings
from easytrain.argument_settings import require
from easytrain.errors import ArgumentError
from easytrain.jobs import check_progress_range
from easytrain.sinks import check_report_to
from easytrain.suggestions import TRANSFORMERS_OPTIMIZERS, as_keywords

if TYPE_CHECKING:
    from easytrain.arguments import TrainingArguments

DTYPES = ("float32", "bfloat16")  # float16 parses, then validate() refuses it (no loss scaling)
OPTIMIZERS = ("adamw", "adafactor", "lion", "sgd")
SCHEDULES = ("constant", "linear", "cosine")
STRATEGIES = ("no", "steps", "epoch")
NON_FINITE_POLICIES = ("skip", "stop", "ignore")
logger = logging.getLogger("easytrain")
#: The run's length when neither max_steps nor num_train_epochs is given (the embedded default job).
DEFAULT_MAX_STEPS = 1500
#: num_train_epochs when it is not given: transformers' default too, so also the value a saved arguments.json or a
#: ported transformers configuration holds beside a positive max_steps (not warned about there).
DEFAULT_EPOCHS = 3
#: max_steps when num_train_epochs decides: transformers' "not set".
EPOCHS_DECIDE = -1
_CUSTOM_SCHEDULE = "override configure_schedule(total_steps) in a trainer to return an optax schedule " \
                   "(docs/custom_trainer.md)"
#: transformers' schedule names (its SchedulerType) that easytrain does not have: what to use instead.
TRANSFORMERS_SCHEDULES = {
    "constant_with_warmup": "use lr_scheduler_type='constant' with warmup_steps or warmup_ratio: easytrain's "
                            "'constant' warms up as this one does (warmup_ratio defaults to 0.05)",
    "cosine_with_restarts": "use lr_scheduler_type='cosine': the same curve at its default of one cycle "
                            f"(num_cycles=1); for restarts, {_CUSTOM_SCHEDULE}",
    "polynomial": "use lr_scheduler_type='linear': the same curve at its default power=1.0, down to 0 rather than "
                  f"lr_end=1e-7; for another power, {_CUSTOM_SCHEDULE}",
    **{name: f"easytrain has no equivalent: {_CUSTOM_SCHEDULE}" for name in (
        "inverse_sqrt", "reduce_lr_on_plateau", "cosine_with_min_lr", "cosine_warmup_with_min_lr",
        "warmup_stable_decay", "greedy")},
}


def resolve_run_length(args: TrainingArguments) -> None:
    """`max_steps` and `num_train_epochs` as given (None: not given) -> the concrete values that decide the run's
    length, in place, before anything reads them. As in transformers: num_train_epochs alone decides (max_steps
    becomes -1); a positive max_steps wins, a num_train_epochs other than 3 beside it warned about; neither gives the
    default job's 1500 steps. The resolved values are what arguments.json and checkpoints store (earlier versions
    stored 1500 and 3 for the default job): a rerun, a resume and every process of a run see the same ones."""
    steps, epochs = args.max_steps, args.num_train_epochs
    if steps is None:
        steps = DEFAULT_MAX_STEPS if epochs is None else EPOCHS_DECIDE
    if epochs is None:
        epochs = DEFAULT_EPOCHS
    elif steps > 0 and epochs != DEFAULT_EPOCHS:
        warn_epochs_unused(epochs, steps)
    args.max_steps, args.num_train_epochs = steps, epochs


@functools.cache
def warn_epochs_unused(epochs: int, steps: int) -> None:
    """Once per process for the same values: a rerun's copy of the arguments (arguments.json) is resolved again."""
    logger.warning("num_train_epochs=%s has no effect: max_steps=%d decides the run's length whenever it is positive; "
                   "leave max_steps out (or pass --max_steps -1) to train for num_train_epochs instead.", epochs, steps)


def scheduler_hint(value: object) -> str:
    """Appended to the refusal of an `lr_scheduler_type`: the easytrain setting for a transformers name, if any."""
    hint = TRANSFORMERS_SCHEDULES.get(value) if isinstance(value, str) else None
    return f" {value!r} is a schedule of transformers' Trainer: {hint}." if hint else ""


def transformers_value_hint(name: str, value: object) -> str:
    """Appended to the refusal of `value` for the field `name`: what transformers' Trainer means by it and the
    easytrain setting that gives it ('' when it means nothing there). The command line, a config file and Python
    refuse such values with their own words (argparse's 'invalid int value'); this sentence is the same in all."""
    if name == "lr_scheduler_type":
        return scheduler_hint(value)
    if name == "optimizer" and (ported := TRANSFORMERS_OPTIMIZERS.get(str(value))) is not None:
        return f" {value!r} is an optimizer of transformers' Trainer: use {as_keywords(ported.settings)}. {ported.why}."
    number = _number(value)
    if number is None:
        return ""
    if name == "warmup_steps" and 0 < number < 1:
        return (f" In transformers 5 a warmup_steps below 1 is a fraction of the run: use warmup_ratio={number} "
                "(rounded down here, up there: docs/porting.md).")
    if name == "num_train_epochs" and not number.is_integer():
        whole = " or ".join(str(n) for n in sorted({max(1, math.floor(number)), max(1, math.ceil(number))}))
        return (f" Epochs are whole here (transformers' may be fractions): use num_train_epochs={whole}, or "
                "max_steps for a part of an epoch (an epoch is rows // train_batch_size updates).")
    return ""


def _number(value: object) -> float | None:
    """`value` as a finite number (a command line's string too), or None."""
    if isinstance(value, bool):
        return None
    try:
        number = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def check_values(args: TrainingArguments) -> None:
    """Every value check of `validate` after the types: raises `ArgumentError` naming the field and the fix."""
    positive_ints = ("train_batch_size", "eval_batch_size", "gradient_accumulation_steps", "max_length",
                     "logging_steps", "eval_steps", "save_steps")
    for name in positive_ints:
        value = getattr(args, name)
        require(isinstance(value, int) and value > 0, name, f"must be a positive integer, got {value!r}.")
    require(args.learning_rate > 0 and math.isfinite(args.learning_rate), "learning_rate",
             f"must be a positive number, got {args.learning_rate!r}.")
    require(args.num_train_epochs > 0 or args.max_steps > 0, "num_train_epochs",
             "must be positive, or set max_steps > 0.")
    require(args.train_batch_size % args.gradient_accumulation_steps == 0, "gradient_accumulation_steps",
             f"must divide train_batch_size={args.train_batch_size}; e.g. use "
             f"{_divisors_hint(args.train_batch_size)}.")
    require(0.0 <= args.warmup_ratio <= 1.0, "warmup_ratio", f"must be in [0, 1], got {args.warmup_ratio}.")
    require(args.warmup_steps >= 0, "warmup_steps", f"must be >= 0, got {args.warmup_steps}.")
    require(args.weight_decay >= 0, "weight_decay", f"must be >= 0, got {args.weight_decay}.")
    require(args.max_grad_norm >= 0, "max_grad_norm", f"must be >= 0 (0 disables), got {args.max_grad_norm}.")
    require(0 <= args.validation_split_percentage < 100, "validation_split_percentage",
             f"must be in [0, 100), got {args.validation_split_percentage}.")
    require(args.save_total_limit is None or args.save_total_limit > 0, "save_total_limit",
             f"must be a positive number of checkpoints to keep, or unset (null): unset keeps every checkpoint "
             f"(save_strategy='no' saves none); got {args.save_total_limit}.")
    for name in ("dtype", "param_dtype"):
        require(getattr(args, name) != "float16", name,
                 "float16 needs dynamic loss scaling, which easytrain does not do: without it small gradients "
                 "underflow to zero silently. Use 'bfloat16' (same exponent range as float32) or 'float32'.")
    for name, allowed in (("dtype", DTYPES), ("param_dtype", DTYPES), ("optimizer", OPTIMIZERS),
                          ("lr_scheduler_type", SCHEDULES), ("eval_strategy", STRATEGIES),
                          ("save_strategy", STRATEGIES), ("non_finite_policy", NON_FINITE_POLICIES)):
        value = getattr(args, name)
        hint = transformers_value_hint(name, value)
        require(value in allowed, name, f"must be one of {', '.join(allowed)}; got {value!r}."
                                         f"{argument_checks.choice_hint(value)}{hint}")
    if args.eval_metrics is not None:
        from easytrain.eval_metrics import NAMES

        unknown = [name for name in args.eval_metrics if name not in NAMES]
        require(not unknown, "eval_metrics", f"unknown metric(s) {unknown}; choose from {', '.join(NAMES)} ('none' "
                                              "alone for no metrics), or override compute_metrics in your trainer "
                                              "for others.")
    check_report_to(args.report_to)  # names, "none" alone, and optional packages installed
    check_progress_range(args.progress_start, args.progress_end)
    for name in ("data_parallel_size", "fsdp_size", "tensor_parallel_size"):
        value = getattr(args, name)
        require(value == -1 or value > 0, name, f"must be a positive size or -1, got {value}.")
    if args.load_best_model_at_end:
        _check_best_model_settings(args)
    require(isinstance(args.lora_rank, int) and args.lora_rank >= 0, "lora_rank",
             f"must be a positive integer, or 0 to train every weight; got {args.lora_rank!r}.")
    require(args.remat_policy in ("none", "full", "dots"), "remat_policy",
             f"must be 'none', 'full' or 'dots'; got {args.remat_policy!r}.")
    from easytrain.models.masks import IMPLEMENTATIONS

    require(args.attention_implementation in IMPLEMENTATIONS, "attention_implementation",
             f"must be one of {', '.join(map(repr, IMPLEMENTATIONS))}; got {args.attention_implementation!r}.")
    from easytrain.compiler_options import AUTO, parse

    require(isinstance(args.compiler_options, str), "compiler_options",
             f"must be a string: 'auto', 'name=value,...' or ''; got {args.compiler_options!r}.")
    if args.compiler_options.strip() != AUTO:
        parse(args.compiler_options)  # raises naming compiler_options
    require(args.compilation_cache_dir is None or isinstance(args.compilation_cache_dir, str), "compilation_cache_dir",
             f"must be a directory, 'auto' or ''; got {args.compilation_cache_dir!r}.")
    require(isinstance(args.loss_chunk_size, int) and args.loss_chunk_size >= 0, "loss_chunk_size",
             f"must be a positive number of tokens, or 0 to compute the full logits; got {args.loss_chunk_size!r}.")
    require(args.lora_export in ("adapter", "merged", "both"), "lora_export",
             f"must be 'adapter', 'merged' or 'both'; got {args.lora_export!r}.")
    if args.lora_rank:
        from easytrain.lora_config import from_arguments

        from_arguments(args)  # raises naming the lora_* field
    require(args.early_stopping_patience is None or args.early_stopping_patience > 0, "early_stopping_patience",
             f"must be a positive integer or unset, got {args.early_stopping_patience}.")
    argument_settings.check_ranges(args)
    argument_settings.check_settings_apply(args)


def _check_best_model_settings(args: TrainingArguments) -> None:
    """The best checkpoint exists only if checkpoints are saved at steps that were also evaluated."""
    require(args.metric_for_best_model is not None, "load_best_model_at_end",
             "needs metric_for_best_model (e.g. 'eval_loss') to rank checkpoints.")
    require(args.save_strategy != "no" and args.eval_strategy != "no", "load_best_model_at_end",
             "needs both eval_strategy and save_strategy other than 'no'.")
    if (off := argument_settings.checkpoints_off_evaluations(args)) is not None:
        field, fix = off
        raise ArgumentError(field, f"with load_best_model_at_end every checkpoint must follow an evaluation: {fix}.")


def _divisors_hint(n: int) -> str:
    divisors = [d for d in range(1, n + 1) if n % d == 0]
    return ", ".join(str(d) for d in divisors[:8])
