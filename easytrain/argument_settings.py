"""The settings of `TrainingArguments` that must make sense together, checked by `argument_values.validate` once
every field has its type (`argument_checks`): numbers whose meaningless values would train anyway, settings another
one makes inert (warned about or refused, naming the field and the fix), and the best-checkpoint rules.
"""

from __future__ import annotations

import functools
import logging
from typing import Any

from easytrain.argument_checks import field_defaults
from easytrain.errors import ArgumentError
from easytrain.precision_warnings import warn_low_precision_state

logger = logging.getLogger("easytrain")
#: The optimizer settings each optimizer reads (`easytrain.optim.build_optimizer`); the others it ignores.
OPTIMIZER_FIELDS = {"adamw": ("adam_beta1", "adam_beta2", "adam_epsilon"), "lion": ("adam_beta1", "adam_beta2"),
                    "sgd": ("sgd_momentum",), "adafactor": ()}


def require(condition: bool, name: str, message: str) -> None:
    """Raise `ArgumentError(name, message)` unless `condition`."""
    if not condition:
        raise ArgumentError(name, message)


def check_ranges(args: Any) -> None:
    """Numbers whose meaningless values would otherwise train (to NaN, or on nothing)."""
    for name in ("adam_beta1", "adam_beta2"):
        value = getattr(args, name)
        require(0 <= value < 1, name, f"must be in [0, 1) (e.g. 0.9 / 0.999), got {value!r}.")
    require(args.adam_epsilon > 0, "adam_epsilon",
             f"must be a positive number (e.g. 1e-8): 0 divides by zero where a gradient is 0; "
             f"got {args.adam_epsilon!r}.")
    require(0 <= args.sgd_momentum < 1, "sgd_momentum",
             f"must be in [0, 1) (0 for plain SGD), got {args.sgd_momentum!r}.")
    require(args.seed >= 0, "seed", f"must be an integer >= 0, got {args.seed!r}.")
    require(args.profile_steps >= 0, "profile_steps",
             f"must be a number of steps to trace, or 0 for no trace; got {args.profile_steps!r}.")
    require(args.profile_start_step >= 1, "profile_start_step",
             f"must be a step number >= 1 (the first update is step 1); got {args.profile_start_step!r}.")
    for name in ("max_train_samples", "max_eval_samples"):
        value = getattr(args, name)
        require(value is None or value > 0, name,
                 f"must be a positive number of rows, or unset (null) to use them all; got {value!r}.")
    require(args.preprocessing_num_workers is None or args.preprocessing_num_workers > 0,
             "preprocessing_num_workers", f"must be a positive number of processes, or unset (null) to tokenise "
                                          f"in this process; got {args.preprocessing_num_workers!r}.")
    require(args.num_processes is None or args.num_processes > 0, "num_processes",
             f"must be a positive number of processes, or unset to auto-detect; got {args.num_processes!r}.")
    if args.process_id is not None:
        require(args.process_id >= 0, "process_id", f"must be >= 0, got {args.process_id!r}.")
        require(args.num_processes is None or args.process_id < args.num_processes, "process_id",
                 f"must be in [0, {args.num_processes}) for num_processes={args.num_processes}, "
                 f"got {args.process_id!r}.")


def check_settings_apply(args: Any) -> None:
    """Settings that would otherwise be ignored without a word."""
    if args.max_steps > 0:  # with epochs, the trainer checks once it knows the run's length
        from easytrain.profiling import check_window

        check_window(args, args.max_steps)
    require(args.validation_file is None or args.train_file is not None, "validation_file",
             "is used only together with train_file (it would be ignored); pass --train_file too, or drop "
             "validation_file (validation_split_percentage holds out part of the training data).")
    require(args.early_stopping_patience is None or args.eval_strategy != "no", "early_stopping_patience",
             "counts evaluations, but eval_strategy is 'no' (it would never stop): set eval_strategy to 'steps' "
             "or 'epoch', or unset early_stopping_patience.")
    # Not on a resume: a run saved before this check recorded it so, and reruns from its arguments.json.
    require(args.metric_for_best_model is None or args.eval_strategy != "no" or bool(args.resume_from_checkpoint),
             "metric_for_best_model",
             "ranks evaluations, but eval_strategy is 'no' (no checkpoint would be ranked): set eval_strategy to "
             "'steps' or 'epoch', or unset metric_for_best_model.")
    check_best_checkpoint_kept(args)
    from easytrain.lora_config import check_lora_fields_apply  # here: lora_config imports this module

    check_lora_fields_apply(args)
    warn_unread_optimizer_fields(args)
    warn_adafactor_lora(args.optimizer, bool(args.lora_rank or args.lora_adapter_path))
    warn_low_precision_state(args)


def warn_unread_optimizer_fields(args: Any) -> None:
    """Optimizer settings changed from their defaults that the chosen optimizer does not read (Adam's betas for
    Adafactor, ...): warned about, once per process for the same settings (a rerun's copy of the arguments is
    checked again)."""
    reads = OPTIMIZER_FIELDS.get(args.optimizer)
    if reads is None:
        return
    defaults = field_defaults(args)
    unread = tuple((name, getattr(args, name)) for name in sorted({n for f in OPTIMIZER_FIELDS.values() for n in f})
                   if name not in reads and getattr(args, name) != defaults[name])
    if unread:
        _warn_unread(args.optimizer, unread)


@functools.cache
def warn_adafactor_lora(optimizer: str, lora: bool) -> None:
    """Adafactor's step is relative to the weight's RMS (at least 1e-3): LoRA's B starts at zero (a trained adapter's
    is small), so the adapters move about 1000x less than learning_rate says and the run barely trains."""
    if optimizer == "adafactor" and lora:
        logger.warning("optimizer='adafactor' scales each update by the parameter's RMS (at least 1e-3), and LoRA's "
                       "B matrices start at zero: the adapters move about 1000x less per step than learning_rate "
                       "says and barely train (30 steps at 1e-3: |B| 3e-5, against 2.7e-2 with AdamW). Use "
                       "optimizer='adamw' or 'lion', or override configure_optimizer with optax.adafactor(..., "
                       "multiply_by_parameter_scale=False) for an absolute step (transformers.Trainer's Adafactor).")


@functools.cache
def _warn_unread(optimizer: str, unread: tuple[tuple[str, Any], ...]) -> None:
    reads = OPTIMIZER_FIELDS[optimizer]
    logger.warning("optimizer=%r does not read %s, so %s no effect; it reads %s (see the optimizer help).", optimizer,
                   ", ".join(f"{name}={value!r}" for name, value in unread), "it has" if len(unread) == 1 else
                   "they have", ", ".join(reads) if reads else "none of adam_beta1, adam_beta2, adam_epsilon, "
                   "sgd_momentum")


def checkpoints_off_evaluations(args: Any) -> tuple[str, str] | None:
    """The field and fix where some checkpoints are saved at steps with no evaluation (no metric to rank them by),
    else None: the rule both `load_best_model_at_end` and `check_best_checkpoint_kept` apply."""
    if args.save_strategy == "steps":
        if args.eval_strategy == "steps" and args.save_steps % args.eval_steps == 0:
            return None
        return "save_steps", ("use eval_strategy='steps' and a save_steps that is a multiple of eval_steps="
                              f"{args.eval_steps}")
    if args.eval_strategy == args.save_strategy:
        return None
    return "eval_strategy", f"set eval_strategy to save_strategy={args.save_strategy!r}"


def check_best_checkpoint_kept(args: Any) -> None:
    """`metric_for_best_model` with `save_total_limit` keeps the best checkpoint only if checkpoints are saved at
    evaluated steps: one saved elsewhere has no metric to rank it, so the best evaluated model would be evicted and
    `best_step` name another. Refused; only warned about with `early_stopping_patience`, for which the metric may
    be meant (`load_best_model_at_end` refuses it on its own). save_total_limit is 3 by default, so the message says
    so and how to lift it."""
    if (args.metric_for_best_model is None or args.save_total_limit is None or args.load_best_model_at_end
            or "no" in (args.save_strategy, args.eval_strategy)):
        return
    if (off := checkpoints_off_evaluations(args)) is None:
        return
    field, fix = off
    default = " (the default)" if args.save_total_limit == field_defaults(args)["save_total_limit"] else ""
    message = (f"with metric_for_best_model={args.metric_for_best_model!r} and save_total_limit="
               f"{args.save_total_limit}{default}, checkpoints saved off the evaluations (save_strategy="
               f"{args.save_strategy!r}, save_steps={args.save_steps}, eval_strategy={args.eval_strategy!r}, "
               f"eval_steps={args.eval_steps}) carry no metric, so the best evaluated model is never kept: {fix}, or "
               "keep every checkpoint with --save_total_limit None (save_total_limit: null in a config file)")
    if args.early_stopping_patience is not None:
        logger.warning("%s: %s (kept going: the metric may be meant for early_stopping_patience only).", field,
                       message)
        return
    raise ArgumentError(field, message + ".")
