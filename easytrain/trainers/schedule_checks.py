"""The learning-rate schedule on resume: a resume may change it (train longer, another rate), which bends the curve
from the restored step on and is warned about; so is a schedule this easytrain computes otherwise from the same
arguments, which each checkpoint's record of the updates its schedule came to (`SCHEDULE_KEY`) shows. A constant
schedule of the same warmup applies the same rate at every update whatever its length: made longer, it bends nothing,
where the defaults set the rates (not a trainer's own optimizer, nor a schedule of its own wrapping the default's)."""

from __future__ import annotations

import logging
from typing import Any

logger = logging.getLogger("easytrain")

# Changing these is allowed (e.g. training longer) but bends the learning-rate curve from the restored step on.
SCHEDULE_FIELDS = ("max_steps", "num_train_epochs", "learning_rate", "lr_scheduler_type", "warmup_ratio",
                   "warmup_steps")
#: The schedule's fields that are not counts of updates: a change of them bends the curve whatever the updates.
RATE_FIELDS = ("learning_rate", "lr_scheduler_type")
#: The run_info entry of the schedule its run computed from the arguments (`easytrain.optim.schedule_record`).
SCHEDULE_KEY = "schedule"
#: The run_info key recording whether `BaseTrainer.configure_optimizer` built the optimizer state from the arguments
#: (a trainer's own `configure_optimizer` decides its state's layout itself, whatever `optimizer` or `max_grad_norm`
#: say): only then do the arguments tell that layout (`resume_checks.arguments_built_optimizer`), or its rates.
DEFAULT_OPTIMIZER_KEY = "default_optimizer"
#: The record's entry saying the default `configure_schedule` built the schedule the run applies (`run_record`).
DEFAULT_SCHEDULE_MARK = "default"


def warn_schedule_changes(run_info: dict[str, Any], current: dict[str, Any]) -> None:
    """Warn of a schedule changed by its arguments, else of one computed otherwise from the same arguments."""
    stored_args, current_args = run_info.get("arguments") or {}, current["arguments"]
    stored_record, current_record = run_info.get(SCHEDULE_KEY), current.get(SCHEDULE_KEY)
    same_rates = same_constant_rates(run_info, current)
    if schedule_diffs := _schedule_differences(stored_args, current_args, stored_record, current_record, same_rates):
        logger.warning("resuming with a different learning-rate schedule (%s): from the restored step on, the "
                       "curve differs from the one the checkpointed run would have followed", "; ".join(schedule_diffs))
    elif not same_rates and (computed := computed_schedule_changes(stored_record, current_record)):
        logger.warning("resuming with a different learning-rate schedule under the checkpoint's own schedule "
                       "arguments (%s): %s, so from the restored step on the curve differs from the one the "
                       "checkpointed run would have followed%s", "; ".join(computed),
                       *_why_computed_otherwise(stored_record, current_record))


def same_constant_rates(run_info: dict[str, Any], current: dict[str, Any]) -> bool:
    """Whether both runs' schedules are constant (transformers' constant_with_warmup) with the same warmup in
    updates: each then applies the rate the other would at every update, whatever their lengths (the peak, compared
    apart as a `RATE_FIELDS` field, after the same warmup), so a run made longer bends nothing. Only where the
    defaults set the rates on both sides: each run's `default_optimizer` (an optimizer of one's own may carry a
    schedule of its own) and its record marked `DEFAULT_SCHEDULE_MARK` (an override calling `super()` writes the record,
    then may read the run's length whatever the arguments say). A checkpoint written before the mark is warned of."""
    stored, now = run_info.get("arguments") or {}, current["arguments"]
    records = run_info.get(SCHEDULE_KEY), current.get(SCHEDULE_KEY)
    defaults = (run_info.get(DEFAULT_OPTIMIZER_KEY) is True and current.get(DEFAULT_OPTIMIZER_KEY) is True
                and all(_marked_default(record) for record in records))
    if not defaults or stored.get("lr_scheduler_type") != "constant" or now.get("lr_scheduler_type") != "constant":
        return False
    warmups = [record.get("warmup_updates") for record in records]
    return isinstance(warmups[0], int) and warmups[0] == warmups[1]


def _marked_default(record: Any) -> bool:
    """Whether a schedule record (`SCHEDULE_KEY`) says the default `configure_schedule` built the applied schedule."""
    return isinstance(record, dict) and record.get(DEFAULT_SCHEDULE_MARK) is True


def _schedule_differences(stored: dict[str, Any], current: dict[str, Any], stored_record: Any = None,
                          current_record: Any = None, same_rates: bool = False) -> list[str]:
    """The `SCHEDULE_FIELDS` that changed the schedule, listed with the values as stored and given: every
    `max_steps` <= 0 trains `num_train_epochs` (earlier docs wrote 0, the arguments store -1), and `num_train_epochs`
    is compared only where neither side's positive `max_steps` decides the length instead (where one side's does,
    `max_steps` itself differs). Where both runs recorded the updates their schedule came to (`SCHEDULE_KEY`) and
    those agree, the fields that only set them (warmup, length) changed nothing: `--warmup_steps N` given to keep a
    run's warmup is not a change; nor are they where `same_rates` (`same_constant_rates`): the rates agree."""
    before, now = _schedule_as_read(stored), _schedule_as_read(current)
    records = (stored_record, current_record)
    same_updates = same_rates or (all(isinstance(r, dict) and r for r in records)
                                  and not computed_schedule_changes(*records))
    return [f"{key}: checkpoint {stored.get(key)!r} vs now {current.get(key)!r}"
            for key in SCHEDULE_FIELDS if key in before and key in now and before[key] != now[key]
            and not (same_updates and key not in RATE_FIELDS)]


def computed_schedule_changes(stored: Any, now: Any) -> list[str]:
    """How the schedule this run computed (`SCHEDULE_KEY`: `easytrain.optim.schedule_record`) differs from the one
    the checkpoint's run computed. A checkpoint written before the record, or a run whose own `configure_schedule`
    records none, compares nothing: absent is not "changed"."""
    if not isinstance(stored, dict) or not isinstance(now, dict):
        return []
    return [f"the schedule's {what} is now {now[key]} updates where the run started with {stored[key]}"
            for key, what in (("warmup_updates", "warmup"), ("total_updates", "length"))
            if key in stored and key in now and stored[key] != now[key]]


def _why_computed_otherwise(stored: dict[str, Any], now: dict[str, Any]) -> tuple[str, str]:
    """Why the same schedule arguments gave another schedule, and (for a warmup alone) the flag that keeps the
    run's."""
    if stored.get("total_updates") != now.get("total_updates"):
        return ("the run's length in updates is counted otherwise from them (under num_train_epochs: other training "
                "rows or batch size, or an easytrain that counts them otherwise)", "")
    warmup = stored.get("warmup_updates")
    keep = f"--warmup_steps {warmup}" if isinstance(warmup, int) and warmup > 0 else "--warmup_ratio 0"
    return ("this easytrain derives the warmup from them otherwise (how warmup_ratio rounds to whole updates)",
            f" ({keep} keeps the warmup it started with)")


def _schedule_as_read(arguments: dict[str, Any]) -> dict[str, Any]:
    """`SCHEDULE_FIELDS` of `arguments` as the run's length reads them (`_schedule_differences`)."""
    values = {key: arguments.get(key) for key in SCHEDULE_FIELDS}
    steps = values["max_steps"]
    if isinstance(steps, int) and steps > 0:
        del values["num_train_epochs"]
    elif isinstance(steps, int):
        values["max_steps"] = 0
    return values
