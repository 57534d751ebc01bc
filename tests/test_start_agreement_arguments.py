"""Processes given other arguments are refused alike when their trainers are built, in the start's first gather,
before anything those arguments decide (the mesh, compiler options, whether output_dir's token is written): before,
the arguments were compared at set-up only, so a check of the arguments alone at construction raised on one process
while the others went on into the next collective and waited for it, naming nothing. And a start refused once
output_dir is checked (its mesh, its compiler options) leaves no output_dir behind. Processes are threads here,
joined by a stand-in for `multihost_utils.process_allgather`."""

from __future__ import annotations

from typing import Callable

import jax
import pytest
from easytrain import BaseTrainer
from easytrain.arguments import TrainingArguments
from easytrain.errors import ArgumentError, OutputDirError
from easytrain.trainers import run_dir, shared_output_dir
from jax.experimental import multihost_utils
from runs import args_for, as_processes
from test_unreadable_records_agreement import Collective, _process

OTHER_ARGUMENTS = "the processes were given other arguments"
MORE_DEVICES = 4096  # a tensor_parallel_size no test machine's devices fill: the mesh is refused


def _built_each(args_of: Callable[[int], TrainingArguments], monkeypatch,
                build=BaseTrainer, count: int = 2) -> tuple[list, Collective]:
    """`build(args_of(index))` on `count` emulated processes: what each built or raised, and the gathers' count."""
    collective, outcomes = Collective(count, timeout=20), [None] * count
    monkeypatch.setattr(jax, "process_index", lambda: getattr(_process, "index", 0))
    monkeypatch.setattr(run_dir, "_process_count", lambda: count)
    monkeypatch.setattr(jax, "process_count", lambda: count)
    monkeypatch.setattr(multihost_utils, "process_allgather", lambda record: collective.at(_process.index)(record))

    def process(index: int) -> None:
        _process.index = index
        try:
            outcomes[index] = build(args_of(index))
        except Exception as error:  # noqa: BLE001 - reported to the test
            outcomes[index] = error

    as_processes(process, count, "BaseTrainer")
    return outcomes, collective


@pytest.mark.parametrize("save_strategy", ["steps", "no"])
def test_other_compiler_options_are_named_on_every_process_before_xla_refuses_them(tmp_path, monkeypatch,
                                                                                   save_strategy):
    """Before: process 1 raised XLA's refusal of its option alone; process 0 built its trainer (and would have waited
    for process 1 in set-up's first collective). Where output_dir is not checked, the first gather carries the start
    each process decided, so process 1 met XLA's refusal first: it is the cause of the refusal it raises."""
    options = ["", "xla_cpu_no_such_option=1"]
    outcomes, collective = _built_each(lambda index: args_for(tmp_path / "run", compiler_options=options[index],
                                                              save_strategy=save_strategy), monkeypatch)
    for outcome in outcomes:
        assert isinstance(outcome, ArgumentError) and outcome.field == "compiler_options", outcome
        assert OTHER_ARGUMENTS in str(outcome) and "process 1: \"xla_cpu_no_such_option=1\"" in str(outcome), outcome
    own = outcomes[1].__cause__
    if save_strategy == "steps":  # compared in output_dir's token exchange, before the options were read
        assert own is None and outcomes[0].__cause__ is None, own
    else:
        assert isinstance(own, ArgumentError) and OTHER_ARGUMENTS not in str(own) and "xla_cpu_no_such_option" in str(
            own), own
    assert collective.calls == 2  # the digests (in the start's first gather), then the values
    assert not (tmp_path / "run").exists(), "the refused start left its output_dir"


def test_processes_that_would_gather_other_records_first_meet_in_one_refusal(tmp_path, monkeypatch):
    """Process 0 checkpoints (its first gather is output_dir's token), process 1 does not (its first is its start
    decision): the first gather has one size on both, so both name save_strategy. Before, the gathers' records
    differed in size (the stand-in failed stacking them; a real collective mismatches)."""
    strategies = ["steps", "no"]
    outcomes, _ = _built_each(lambda index: args_for(tmp_path / "run", save_strategy=strategies[index]), monkeypatch)
    for outcome in outcomes:
        assert isinstance(outcome, ArgumentError) and outcome.field == "save_strategy", outcome
        assert "save_strategy (process 0: \"steps\"; process 1: \"no\")" in str(outcome), outcome
    assert not (tmp_path / "run").exists(), "the refused start left its output_dir (or its token)"


def test_a_process_refused_for_output_dir_keeps_its_own_error_as_the_cause(tmp_path, monkeypatch):
    """Process 1 sees another output_dir and also fails to read an input of its own: the output_dir refusal wins on
    every process, and process 1's own error is its cause. Before, process 1's own error was dropped."""
    class Reading(BaseTrainer):
        def check_inputs(self) -> None:
            if _process.index == 1:
                raise OSError("the chat template is missing on this host")

    directories = [tmp_path / "run0", tmp_path / "run1"]
    outcomes, _ = _built_each(lambda index: args_for(directories[index]), monkeypatch, Reading)
    assert all(isinstance(outcome, ArgumentError) and outcome.field == "output_dir" for outcome in outcomes), outcomes
    assert isinstance(outcomes[1].__cause__, OSError) and "chat template" in str(outcomes[1].__cause__)
    assert outcomes[0].__cause__ is None


def test_a_multi_process_start_lists_the_directories_it_may_remove_once(tmp_path, monkeypatch):
    """Where output_dir's token is written, `shared_output_dir` removes what process 0 made for a refused start;
    `check_output_dir` no longer lists (and removes) them a second time."""
    listed = []
    real = shared_output_dir.missing_directories

    def counting(directory):
        listed.append(_process.index)
        return real(directory)

    monkeypatch.setattr(shared_output_dir, "missing_directories", counting)
    (taken := tmp_path / "new" / "run").mkdir(parents=True)
    (taken / "results.json").write_text("{}")  # another run's: refused on both, after the token was written
    outcomes, _ = _built_each(lambda index: args_for(taken), monkeypatch)
    assert all(isinstance(outcome, OutputDirError) for outcome in outcomes), outcomes
    assert listed == [0], listed
    outcomes, _ = _built_each(lambda index: args_for(tmp_path / "fresh" / "run", tensor_parallel_size=MORE_DEVICES),
                              monkeypatch)
    assert all(isinstance(outcome, ArgumentError) for outcome in outcomes), outcomes
    assert not (tmp_path / "fresh").exists(), "the refused start left the directories made for it"


@pytest.mark.parametrize("refused", [{"tensor_parallel_size": MORE_DEVICES},
                                     {"compiler_options": "xla_cpu_no_such_option=1"}])
def test_a_start_refused_for_its_mesh_or_compiler_options_leaves_no_output_dir(tmp_path, refused):
    """A single process: the same first error as before, and output_dir (made by `check_writable`) removed again.
    Before, both were refused after `check_output_dir` returned, and the new directories stayed."""
    with pytest.raises(ArgumentError) as caught:
        BaseTrainer(args_for(tmp_path / "new" / "run", **refused))
    assert caught.value.field == next(iter(refused)), caught.value
    assert list(tmp_path.iterdir()) == [], "the refused start left the directories it made"
