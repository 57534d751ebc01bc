"""A resume under the checkpoint's own schedule arguments still warns where the schedule this easytrain computes
from them is not the one the run started with: each checkpoint records the warmup and the length in updates its
run computed (an easytrain that rounded warmup_ratio otherwise gave 1/3 of 6 updates one warmup update where this
one gives two, and the resumed curve changed in silence). A resume computing the same schedule warns nothing, and
a checkpoint written before the record resumes as before."""

import logging
import math
from fractions import Fraction

import pytest

from easytrain import BaseTrainer, optim
from easytrain.checkpoint import CheckpointManager
from easytrain.trainers.resume import check_resumable
from easytrain.trainers.resume_checks import DEFAULT_OPTIMIZER_KEY, SCHEDULE_KEY
from easytrain.trainers.schedule_checks import DEFAULT_SCHEDULE_MARK
from runs import StopAt, args_for, copied_run, logged

SCHEDULE = dict(max_steps=6, save_steps=3, warmup_ratio=1 / 3, learning_rate=1e-2, lr_scheduler_type="linear")
#: What the warning says of the run below: the warmup as the older rule computed it, and as this easytrain does.
WARMUP_CHANGED = "the schedule's warmup is now 2 updates where the run started with 1"


def decimal_rule(args, total_steps: int) -> int:
    """An earlier easytrain's warmup rule (63e5fbd): the ratio read as its printed decimal, so 1/3 of 6 updates is
    1 (0.3333333333333333 * 6 is below 2)."""
    if args.warmup_steps > 0:
        return min(args.warmup_steps, total_steps)
    return math.floor(Fraction(str(args.warmup_ratio)) * total_steps)


@pytest.fixture(scope="module")
def older_run(tmp_path_factory):
    """A run of 6 updates stopped (and checkpointed) at step 3, started under `decimal_rule`."""
    output_dir = tmp_path_factory.mktemp("older") / "run"
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(optim, "warmup_steps", decimal_rule)
        BaseTrainer(args_for(output_dir, **SCHEDULE), callbacks=[StopAt(3)]).train()
    return output_dir


def schedule_warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records
            if r.levelno >= logging.WARNING and "learning-rate schedule" in r.getMessage()]


def resumed(run, caplog) -> list[str]:
    """Resume `run` to its end with its own arguments; the schedule warnings it logged."""
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="easytrain"):
        BaseTrainer(args_for(run, resume_from_checkpoint="latest", **SCHEDULE)).train()
    return schedule_warnings(caplog)


def test_the_checkpoint_records_the_schedule_its_run_computed(older_run):
    with CheckpointManager(older_run / "checkpoints", read_only=True) as manager:
        assert manager.read_run_info(3)[SCHEDULE_KEY] == {"warmup_updates": 1, "total_updates": 6,
                                                          DEFAULT_SCHEDULE_MARK: True}


def test_a_schedule_computed_otherwise_from_the_same_arguments_is_warned_of(older_run, tmp_path, caplog):
    run = copied_run(older_run, tmp_path / "run")
    warned = resumed(run, caplog)
    assert len(warned) == 1 and WARMUP_CHANGED in warned[0], warned
    assert "how warmup_ratio rounds" in warned[0] and "--warmup_steps 1 keeps" in warned[0], warned  # why; the fix
    rates = logged(run, "learning_rate")
    assert rates[4] == pytest.approx(0.01 * 3 / 4), rates  # the resumed run follows this easytrain's schedule


def test_the_same_schedule_resumes_without_a_warning(older_run, tmp_path, caplog, monkeypatch):
    run = copied_run(older_run, tmp_path / "run")
    monkeypatch.setattr(optim, "warmup_steps", decimal_rule)  # the rule the run started under
    assert resumed(run, caplog) == []


def run_info(schedule: dict | None, **arguments) -> dict:
    info = {"format_version": 1, "arguments": {"seed": 0, "max_steps": 6, "warmup_ratio": 1 / 3, **arguments},
            "model_config": None, DEFAULT_OPTIMIZER_KEY: True}
    return info if schedule is None else {**info, SCHEDULE_KEY: schedule}


def checked(caplog, stored: dict, current: dict) -> list[str]:
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="easytrain"):
        assert check_resumable(stored, current) == []
    return schedule_warnings(caplog)


def test_a_checkpoint_without_the_record_resumes_as_before(caplog):
    assert checked(caplog, run_info(None), run_info({"warmup_updates": 2, "total_updates": 6})) == []


def test_a_length_computed_otherwise_is_named(caplog):
    warned = checked(caplog, run_info({"warmup_updates": 2, "total_updates": 6}),
                     run_info({"warmup_updates": 2, "total_updates": 8}))
    assert len(warned) == 1 and "length is now 8 updates where the run started with 6" in warned[0], warned


def test_a_changed_argument_is_warned_of_once_naming_the_argument(caplog):
    """Another max_steps changes the computed length too: the argument's warning says why."""
    warned = checked(caplog, run_info({"warmup_updates": 2, "total_updates": 6}),
                     run_info({"warmup_updates": 2, "total_updates": 8}, max_steps=8))
    assert len(warned) == 1 and "max_steps: checkpoint 6 vs now 8" in warned[0], warned


@pytest.mark.parametrize("advice", [dict(warmup_steps=1, warmup_ratio=1 / 3), dict(warmup_ratio=0.0)])
def test_following_the_warnings_advice_resumes_the_recorded_schedule_without_a_warning(caplog, advice):
    """`--warmup_steps 1` (or `--warmup_ratio 0` for a run without warmup) is what the warning above offers to keep
    the run's warmup: the schedule computed from it is the recorded one, so the changed argument bends nothing."""
    warmup = advice.get("warmup_steps", 0)
    assert checked(caplog, run_info({"warmup_updates": warmup, "total_updates": 6}),
                   run_info({"warmup_updates": warmup, "total_updates": 6}, **advice)) == []


def test_a_changed_rate_is_warned_of_even_where_the_updates_agree(caplog):
    warned = checked(caplog, run_info({"warmup_updates": 2, "total_updates": 6}),
                     run_info({"warmup_updates": 2, "total_updates": 6}, learning_rate=0.5))
    assert len(warned) == 1 and "learning_rate: checkpoint None vs now 0.5" in warned[0], warned


# ----------------------------------------------------------------------------- a constant schedule's length


def constant_info(schedule: dict | None, **arguments) -> dict:
    """A constant schedule's run_info; its record (where given) marked as the default `configure_schedule`'s."""
    marked = None if schedule is None else {**schedule, DEFAULT_SCHEDULE_MARK: True}
    return run_info(marked, **{"lr_scheduler_type": "constant", "learning_rate": 1e-2, **arguments})


@pytest.mark.parametrize("stored, now", [
    (dict(max_steps=6), dict(max_steps=12)),  # a run made longer
    (dict(max_steps=-1, num_train_epochs=2), dict(max_steps=-1, num_train_epochs=5)),
    (dict(max_steps=6, warmup_steps=2), dict(max_steps=12, warmup_steps=2)),  # the same warmup, then the peak
])
def test_a_constant_schedule_made_longer_with_the_same_warmup_resumes_without_a_warning(caplog, stored, now):
    """After its warmup a constant schedule holds the peak whatever the run's length: a longer run applies the rate
    the checkpointed run would have at every update (it warned "max_steps: checkpoint 6 vs now 12")."""
    warmup = stored.get("warmup_steps", 0)
    assert checked(caplog, constant_info({"warmup_updates": warmup, "total_updates": 6}, warmup_ratio=0.0, **stored),
                   constant_info({"warmup_updates": warmup, "total_updates": 12}, warmup_ratio=0.0, **now)) == []


def test_a_constant_schedule_counted_longer_from_the_same_arguments_resumes_without_a_warning(caplog):
    assert checked(caplog, constant_info({"warmup_updates": 0, "total_updates": 6}, warmup_ratio=0.0),
                   constant_info({"warmup_updates": 0, "total_updates": 8}, warmup_ratio=0.0)) == []


def test_a_constant_schedule_whose_warmup_grew_with_its_length_is_warned_of(caplog):
    """warmup_ratio 1/3 of 12 updates is 4: the rate of updates 2 and 3 is no longer the peak."""
    warned = checked(caplog, constant_info({"warmup_updates": 2, "total_updates": 6}),
                     constant_info({"warmup_updates": 4, "total_updates": 12}, max_steps=12))
    assert len(warned) == 1 and "max_steps: checkpoint 6 vs now 12" in warned[0], warned


@pytest.mark.parametrize("kind", ["linear", "cosine"])
def test_a_decaying_schedule_made_longer_is_still_warned_of(caplog, kind):
    warned = checked(caplog, run_info({"warmup_updates": 0, "total_updates": 6}, lr_scheduler_type=kind),
                     run_info({"warmup_updates": 0, "total_updates": 12}, lr_scheduler_type=kind, max_steps=12))
    assert len(warned) == 1 and "max_steps: checkpoint 6 vs now 12" in warned[0], warned


def test_a_schedule_turned_constant_is_still_warned_of(caplog):
    warned = checked(caplog, run_info({"warmup_updates": 0, "total_updates": 6}, lr_scheduler_type="linear"),
                     constant_info({"warmup_updates": 0, "total_updates": 12}, max_steps=12))
    assert len(warned) == 1 and "lr_scheduler_type: checkpoint 'linear' vs now 'constant'" in warned[0], warned


@pytest.mark.parametrize("warmup, updates", [
    (dict(warmup_steps=0, warmup_ratio=0.0), 0),
    (dict(warmup_steps=2, warmup_ratio=0.0), 2),
    (dict(warmup_steps=0, warmup_ratio=0.25), 3),
])
def test_a_constant_schedule_of_a_checkpoint_without_the_record_made_longer_is_warned_of(caplog, warmup, updates):
    """A checkpoint written before the record (or by a trainer whose own `configure_schedule` never called `super()`)
    does not say the defaults set its rates: its arguments alone cannot tell, so the new length is warned of."""
    stored = constant_info(None, **warmup)
    now = constant_info({"warmup_updates": updates, "total_updates": 12}, max_steps=12, **warmup)
    assert len(warned := checked(caplog, stored, now)) == 1 and "max_steps: checkpoint 6 vs now 12" in warned[0]


def test_a_trainers_own_schedule_made_longer_is_still_warned_of(caplog):
    """A `configure_schedule` of a trainer's own records nothing, and may decay over the run's length whatever
    lr_scheduler_type says: the length's change is warned of as before."""
    warned = checked(caplog, constant_info(None, warmup_steps=0, warmup_ratio=0.0),
                     constant_info(None, warmup_steps=0, warmup_ratio=0.0, max_steps=12))
    assert len(warned) == 1 and "max_steps: checkpoint 6 vs now 12" in warned[0], warned


def test_a_longer_constant_run_resumes_without_a_warning_at_the_same_rates(tmp_path, caplog):
    schedule = dict(save_steps=2, learning_rate=1e-2, lr_scheduler_type="constant", warmup_ratio=0.0)
    BaseTrainer(args_for(tmp_path / "run", max_steps=4, **schedule), callbacks=[StopAt(2)]).train()
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="easytrain"):
        BaseTrainer(args_for(tmp_path / "run", resume_from_checkpoint="latest", max_steps=6, **schedule)).train()
    assert schedule_warnings(caplog) == []
    assert list(logged(tmp_path / "run", "learning_rate").values()) == pytest.approx([1e-2] * 6)
