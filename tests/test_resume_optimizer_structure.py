"""Settings that add or remove a part of the optimizer state (clipping on or off, Adafactor's decay, SGD's momentum)
cannot change on resume: the checkpoint's state would not fit. Each is refused by name before any array is read,
with the values that keep the state; a state tree that still differs is reported as other settings, never as a
damaged checkpoint; and warnings about allowed changes come only once every refusal check has passed."""

import itertools
import logging
import re

import jax
import jax.numpy as jnp
import optax
import pytest

from easytrain import ArgumentError, BaseTrainer, TrainingArguments
from easytrain.checkpoint import CheckpointMismatchError
from easytrain.errors import CheckpointReadError
from easytrain.optim import build_optimizer, build_schedule, clip_by_global_norm
from easytrain.trainers.resume import check_resumable
from runs import args_for, snapshot
from test_resume_inputs import NoCompute, resume


def run_info_with(**arguments) -> dict:
    defaults = dict(seed=0, train_batch_size=4, tokenizer_name=None, model_name_or_path=None)
    return {"format_version": 1, "arguments": defaults | arguments, "model_config": None}


# ----------------------------------------------------------------------------- which settings switch a state part

OPTIMIZERS = ("adamw", "lion", "adafactor", "sgd")
VALUES = {"max_grad_norm": (0.0, 1.0, 1e9), "weight_decay": (0.0, 0.1), "sgd_momentum": (0.0, 0.5, 0.9)}


def state_tree(arguments: TrainingArguments):
    """The optimizer state's tree as a checkpoint stores it: every node (empty ones too) and each leaf's shape."""
    params = {"kernel": jax.ShapeDtypeStruct((4, 4), jnp.float32), "bias": jax.ShapeDtypeStruct((4,), jnp.float32)}
    state = jax.eval_shape(build_optimizer(arguments, build_schedule(arguments, 10)).init, params)
    return jax.tree.structure(state), [leaf.shape for leaf in jax.tree.leaves(state)]


@pytest.mark.parametrize("optimizer", OPTIMIZERS)
def test_the_switches_a_resume_compares_are_exactly_the_settings_that_change_the_state_tree(optimizer):
    """Two settings of one optimizer build the same state tree if and only if `state_switches` agrees: a switch the
    resume does not compare would fail in Orbax, one it compares needlessly would refuse a resume that fits."""
    from easytrain.optim import state_switches

    combinations = [dict(zip(VALUES, values)) for values in itertools.product(*VALUES.values())]
    built = [(TrainingArguments(optimizer=optimizer, **values), values) for values in combinations]
    trees = {id(arguments): state_tree(arguments) for arguments, _ in built}
    for (first, first_values), (second, second_values) in itertools.combinations(built, 2):
        same_tree = trees[id(first)] == trees[id(second)]
        same_switches = (state_switches({"optimizer": optimizer, **first_values})
                         == state_switches({"optimizer": optimizer, **second_values}))
        assert same_tree == same_switches, (first_values, second_values)


# ----------------------------------------------------------------------------- refused by name, before any array


@pytest.mark.parametrize("optimizer, field, stored, now, fix", [
    ("adamw", "max_grad_norm", 1.0, 0.0, r"any positive max_grad_norm keeps .*1e9 to clip effectively never"),
    ("lion", "max_grad_norm", 0.0, 1.0, r"max_grad_norm 0 keeps"),
    ("adafactor", "weight_decay", 0.0, 0.1, r"weight_decay 0 keeps"),
    ("adafactor", "weight_decay", 0.1, 0.0, r"any positive weight_decay keeps"),
    ("sgd", "sgd_momentum", 0.9, 0.0, r"any positive sgd_momentum keeps"),
    ("sgd", "sgd_momentum", 0.0, 0.9, r"sgd_momentum 0 keeps"),
])
def test_a_setting_that_switches_a_state_part_is_refused_naming_it_both_values_and_the_fix(optimizer, field, stored,
                                                                                             now, fix):
    with pytest.raises(ArgumentError, match=rf"^{field}: .*checkpoint {stored!r}.* vs now {now!r}") as refused:
        check_resumable(run_info_with(optimizer=optimizer, **{field: stored}),
                        run_info_with(optimizer=optimizer, **{field: now}))
    assert re.search(fix, str(refused.value)) and "--init_weights_from" in str(refused.value), refused.value


@pytest.mark.parametrize("optimizer, field, stored, now", [
    ("adamw", "max_grad_norm", 1.0, 1e9), ("adamw", "weight_decay", 0.0, 0.1), ("lion", "weight_decay", 0.1, 0.0),
    ("adafactor", "weight_decay", 0.1, 0.5), ("sgd", "sgd_momentum", 0.9, 0.5),
])
def test_a_value_that_keeps_the_state_resumes_with_a_warning_naming_it(caplog, optimizer, field, stored, now):
    """sgd_momentum 0.9 -> 0.5 changed every later update in silence: warned like Adam's betas."""
    with caplog.at_level(logging.WARNING, logger="easytrain"):
        assert check_resumable(run_info_with(optimizer=optimizer, **{field: stored}),
                               run_info_with(optimizer=optimizer, **{field: now})) == []
    assert f"{field}: checkpoint {stored!r} vs now {now!r}" in caplog.text
    assert "not what the checkpointed run would have computed" in caplog.text


def test_a_setting_the_optimizer_does_not_read_is_not_warned_about_on_resume(caplog):
    with caplog.at_level(logging.WARNING, logger="easytrain"):
        check_resumable(run_info_with(optimizer="adamw", sgd_momentum=0.9),
                        run_info_with(optimizer="adamw", sgd_momentum=0.0))
    assert not caplog.records, caplog.text


def test_a_checkpoint_that_did_not_record_a_switch_is_not_refused_for_it():
    assert check_resumable(run_info_with(optimizer="sgd"), run_info_with(optimizer="sgd", sgd_momentum=0.0)) == []


def test_clipping_switched_off_on_a_real_checkpoint_is_refused_untouched_and_a_huge_norm_resumes(run_copy):
    """The shared run clips at 1.0 (the default): max_grad_norm 0 failed in the restore, listing 40 optimizer keys
    as a mismatch that blamed another optimizer or damage. 1e9 keeps the state and restores."""
    before = snapshot(run_copy)
    with pytest.raises(ArgumentError, match=r"^max_grad_norm: .*checkpoint 1\.0 vs now 0\.0.*1e9"):
        resume(run_copy, max_grad_norm=0.0).setup()
    assert snapshot(run_copy) == before
    trainer = BaseTrainer(args_for(run_copy, max_steps=6, resume_from_checkpoint="latest", max_grad_norm=1e9))
    trainer.setup()
    assert int(trainer.state.step) == 4


# ----------------------------------------------------------------------------- what still reaches the restore


class ExtraEmptyState(NoCompute):
    """The default optimizer with one more stateless step at its end: the same arrays under the same names, but one
    more (empty) node in the state tree, which Orbax compares."""

    def configure_optimizer(self, schedule):
        arguments = self._arguments
        unclipped = build_optimizer(TrainingArguments(**{**arguments.to_dict(), "max_grad_norm": 0.0}), schedule)
        return optax.chain(clip_by_global_norm(arguments.max_grad_norm), unclipped, optax.identity())


def test_a_state_tree_that_still_differs_is_reported_as_other_settings_not_damage(run_copy, caplog):
    """Orbax's "tree structures do not match" read as "may be corrupted or truncated ... resume from an earlier
    one" for a sound checkpoint; and the refusal came after warnings of the changes it would have allowed."""
    before = snapshot(run_copy)
    with caplog.at_level(logging.WARNING, logger="easytrain"):
        with pytest.raises(CheckpointMismatchError) as refused:
            ExtraEmptyState(args_for(run_copy, max_steps=6, resume_from_checkpoint="latest")).setup()
    message = str(refused.value)
    assert not isinstance(refused.value, CheckpointReadError)
    assert "intact" in message and "corrupted" not in message and "opt_state" in message, message
    assert "arguments" in message and "configure_optimizer" in message, message
    assert re.search(r"Source: .*, 3\)\n.*Target: .*, 2\)", message), message  # this run's 3 steps, the stored 2
    assert snapshot(run_copy) == before
    assert "learning-rate schedule" not in caplog.text, caplog.text


def test_warnings_come_only_after_every_refusal_check_passed(caplog):
    """A refused resume (another seed) also changed max_steps: the schedule warning was logged, then the refusal."""
    with caplog.at_level(logging.WARNING, logger="easytrain"):
        with pytest.raises(ArgumentError, match="seed"):
            check_resumable(run_info_with(max_steps=4, seed=0), run_info_with(max_steps=6, seed=1))
    assert not caplog.records, caplog.text


def test_a_structure_refusal_counts_the_nodes_that_differ_not_orbaxs_lines(tmp_path):
    """Orbax prints each node that differs as three lines (its path, Source, Target) and a hint of its own; the
    refusal showed four nodes of nine and said 'and 15 more', counting lines. Built as `restore_checkpoint` builds
    it, from the real Orbax error, where this run's state has nine empty nodes the checkpoint lacks."""
    from easytrain.checkpoint import CheckpointManager
    from easytrain.checkpoint_read_errors import innermost
    from easytrain.checkpoint_signatures import CheckpointStructureError

    with CheckpointManager(tmp_path, async_save=False) as manager:
        manager.save(1, state={"params": {"w": jnp.ones(2)}}, data_state={}, run_info={})
        added = {f"added_{i}": {} for i in range(9)}
        target = {"params": {"w": jax.ShapeDtypeStruct((2,), jnp.float32), **added}}
        with pytest.raises(ValueError, match="tree structures do not match") as refused:
            manager.restore_state(1, abstract_state=target)
    message = str(CheckpointStructureError(tmp_path / "1", str(innermost(refused.value))))
    assert message.count("- Source:") == 4 and "params.added_3:" in message, message
    assert "\n  and 5 more\n" in message and "partial_restore" not in message, message
    fix = f"--init_weights_from {tmp_path / '1'} (a fresh optimizer state)."
    assert message.splitlines()[-1].endswith(fix), message
