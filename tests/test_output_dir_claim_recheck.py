"""Trainers built side by side on one output_dir (a sweep that builds them all first) each had the directory checked
when built, while it was empty: the second to train then trained over the first's run (its retention deleted the
first's checkpoints, its export replaced the first's final_model). `train()` checks the directory again once it holds
the lock, and refuses, writing nothing, what a trainer built at that moment would be refused; every process of a
multi-process run takes process 0's decision."""

import threading
from pathlib import Path

import numpy as np
import pytest

from easytrain import BaseTrainer
from easytrain.checkpoint import finalized_steps
from easytrain.errors import OutputDirError
from easytrain.trainers import run_lock
from easytrain.trainers.claim import claim_run, recheck_output_dir
from easytrain.trainers.run_dir import check_output_dir
from runs import args_for, as_processes, snapshot


def refusal_now(args) -> str:
    """The error a trainer built now on `args` gets."""
    with pytest.raises(OutputDirError) as refused:
        check_output_dir(args)
    return str(refused.value)


def test_the_later_of_two_trainers_built_on_an_empty_dir_is_refused_at_train(tmp_path):
    run = tmp_path / "run"
    first = BaseTrainer(args_for(run))
    second = BaseTrainer(args_for(run, max_steps=6, save_total_limit=1, learning_rate=5e-2, seed=7))
    first.train()
    before = snapshot(run)
    with pytest.raises(OutputDirError) as refused:
        second.train()
    assert str(refused.value) == refusal_now(args_for(run)), "not the error a trainer built now gets"
    assert "already holds a run with checkpoints at steps [2, 4]" in str(refused.value)
    assert snapshot(run) == before, "the refused trainer wrote into the other run's output_dir"
    assert finalized_steps(run / "checkpoints") == [2, 4]


def test_an_exported_run_without_checkpoints_is_not_overwritten_by_a_trainer_built_before_it(tmp_path):
    run, kept = tmp_path / "run", dict(save_strategy="no", save_pretrained_at_end=True)
    first, second = BaseTrainer(args_for(run, **kept)), BaseTrainer(args_for(run, learning_rate=5e-2, **kept))
    first.train()
    before = snapshot(run)
    with pytest.raises(OutputDirError, match="holds another run's final_model"):
        second.train()
    assert snapshot(run) == before


def test_a_resume_decided_at_build_that_no_longer_holds_is_refused(run_copy):
    """Both continue the run's newest checkpoint (step 4); the first trains on to step 6: the second, restored from
    step 4, would set the first's step 6 aside as if resuming an older step on purpose."""
    first = BaseTrainer(args_for(run_copy, max_steps=6, resume_from_checkpoint="latest"))
    second = BaseTrainer(args_for(run_copy, max_steps=8, resume_from_checkpoint="latest"))
    first.train()
    before = snapshot(run_copy)
    with pytest.raises(OutputDirError) as refused:
        second.train()
    message = str(refused.value)
    assert "changed since this trainer was built" in message and "step 4" in message and "step 6" in message
    assert snapshot(run_copy) == before
    assert not (run_copy / "superseded_checkpoints").exists()


def test_recheck_passes_the_decisions_that_still_hold(run_copy, tmp_path):
    resume = check_output_dir(args_for(run_copy, resume_from_checkpoint="latest"))
    recheck_output_dir(args_for(run_copy, resume_from_checkpoint="latest"), resume)  # its own checkpoints
    fresh = args_for(tmp_path / "new")
    recheck_output_dir(fresh, check_output_dir(fresh))  # still empty
    overwrite = args_for(run_copy, overwrite_output_dir=True)
    recheck_output_dir(overwrite, check_output_dir(overwrite))  # removing the run there is what it asks for


def claimed_by_processes(args, count: int) -> list[BaseException | None]:
    """`claim_run` in one thread per process (index = position), joined by a fake `broadcast_one_to_all`."""
    barrier, sent = threading.Barrier(count, timeout=60), [None]
    outcomes: list[BaseException | None] = [None] * count

    def broadcast_for(index):
        def broadcast(value):
            if index == 0:
                sent[0] = np.array(value)
            barrier.wait()
            received = np.array(sent[0])
            barrier.wait()
            return received
        return broadcast

    def process(index):
        try:
            claim_run(args, None, index == 0, broadcast=broadcast_for(index))
        except BaseException as error:  # noqa: BLE001 - reported to the test
            outcomes[index] = error
        finally:
            if index == 0:
                run_lock.release(args.output_dir)

    as_processes(process, count, "the claim")
    return outcomes


def test_every_process_takes_process_0s_refusal(run_copy):
    """Each process decided a fresh run when built; process 0 finds another run there under the lock."""
    outcomes = claimed_by_processes(args_for(run_copy), 3)
    assert all(isinstance(error, OutputDirError) for error in outcomes), outcomes
    assert len({str(error) for error in outcomes}) == 1, "the processes raised different errors"
    assert "already holds a run with checkpoints at steps [2, 4]" in str(outcomes[0])


def test_every_process_goes_on_when_process_0_claims(tmp_path: Path):
    assert claimed_by_processes(args_for(tmp_path / "run"), 3) == [None, None, None]
