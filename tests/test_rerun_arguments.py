"""A run's own `arguments.json` reruns it: `easytrain train --config runs/x/arguments.json` continues from the newest
checkpoint (never an old step it was once resumed from), never wipes the run, and starts over a run killed before its
first checkpoint. A resume refused for changed settings names the arguments that differ and that rerun."""

import json
from pathlib import Path

import pytest

from easytrain import ArgumentError, BaseTrainer
from easytrain.checkpoint import CheckpointNotFoundError, finalized_steps
from easytrain.config_io import parse_task_arguments
from easytrain.trainers.resume import check_resumable
from easytrain.trainers.claim import claim_output_dir
from easytrain.trainers.run_dir import check_output_dir
from runs import args_for, snapshot


def rerun(output_dir: Path, *flags: str):
    """`easytrain train --config output_dir/arguments.json FLAGS`: checked, then claimed, as the trainer does."""
    args, _ = parse_task_arguments(["--config", str(output_dir / "arguments.json"), *flags])
    resume = check_output_dir(args)
    claim_output_dir(args, resume)
    return resume


def test_fresh_runs_arguments_continue_its_newest_checkpoint(run_copy):
    resume = rerun(run_copy, "--max_steps", "6")
    assert resume is not None and resume[1] == 4
    assert finalized_steps(run_copy / "checkpoints") == [2, 4]


def test_arguments_of_a_resume_from_an_old_step_continue_the_newest(run_copy):
    BaseTrainer(args_for(run_copy, resume_from_checkpoint=str(run_copy / "checkpoints" / "2"))).save_arguments()
    resume = rerun(run_copy, "--max_steps", "6")
    assert resume is not None and resume[1] == 4
    assert finalized_steps(run_copy / "checkpoints") == [2, 4] and not (run_copy / "superseded_checkpoints").exists()


def test_saved_overwrite_output_dir_never_wipes_the_run_on_a_rerun(run_copy):
    before = snapshot(run_copy / "checkpoints")
    BaseTrainer(args_for(run_copy, overwrite_output_dir=True, resume_from_checkpoint="latest")).save_arguments()
    saved = json.loads((run_copy / "arguments.json").read_text())
    assert saved["overwrite_output_dir"] is False
    rerun(run_copy, "--max_steps", "6")
    assert snapshot(run_copy / "checkpoints") == before


def test_rerun_of_a_run_killed_before_its_first_checkpoint_starts_over(tmp_path):
    output_dir = tmp_path / "run"
    BaseTrainer(args_for(output_dir)).save_arguments()
    (output_dir / "metrics.jsonl").write_text('{"step": 1, "split": "train", "loss": 5.0}\n')
    (output_dir / "metrics.csv").write_text("step,split,time,loss\n1,train,0.0,5.0\n")
    assert rerun(output_dir) is None
    assert not (output_dir / "metrics.jsonl").exists() and not (output_dir / "metrics.csv").exists()


def test_latest_without_any_run_in_output_dir_is_still_refused(tmp_path):
    with pytest.raises(CheckpointNotFoundError, match="no complete checkpoint"):
        check_output_dir(args_for(tmp_path / "typo", resume_from_checkpoint="latest"))


def test_rerun_of_a_finished_run_without_checkpoints_is_refused(tmp_path):
    output_dir = tmp_path / "run"
    BaseTrainer(args_for(output_dir, save_strategy="no")).save_arguments()
    (output_dir / "results.json").write_text("{}")
    with pytest.raises(Exception, match="results.json"):
        rerun(output_dir)


def run_info(**arguments):
    base = dict(output_dir="runs/mine", seed=0, train_batch_size=8, max_length=32, train_file=None,
                tokenizer_name=None, model_name_or_path=None, learning_rate=1e-3)
    return {"format_version": 1, "arguments": base | arguments, "model_config": {"vocab_size": 18}}


README_RUN = dict(train_file="data/corpus.txt", tokenizer_name="data/tok")


def test_architecture_refusal_names_the_arguments_left_out_and_the_rerun():
    stored = run_info(**README_RUN) | {"model_config": {"vocab_size": 295}}
    with pytest.raises(ArgumentError, match=r"vocab_size.*train_file: checkpoint 'data/corpus.txt' vs now None.*"
                                            r"tokenizer_name.*--config runs/mine/arguments.json"):
        check_resumable(stored, run_info(learning_rate=1e-4))


def test_data_refusal_names_every_differing_argument_and_the_rerun():
    with pytest.raises(ArgumentError, match=r"train_file.*learning_rate: checkpoint 0.001 vs now 0.0001.*"
                                            r"--config runs/mine/arguments.json"):
        check_resumable(run_info(**README_RUN), run_info(learning_rate=1e-4))


def test_tokenizer_refusal_points_to_the_rerun():
    stored, current = run_info(tokenizer_name="data/tok"), run_info(tokenizer_name="other/tok")
    with pytest.raises(ArgumentError, match=r"tokenizer_name.*--config runs/mine/arguments.json"):
        check_resumable(stored, current)


def test_a_multi_process_runs_arguments_leave_the_launch_to_the_rerun(tmp_path):
    """`coordinator_address`, `num_processes` and `process_id` describe one launch (process 0's, in arguments.json),
    not the run: saved, a one-process rerun waited forever as the coordinator of a 2-process job, and two hosts
    rerunning it both claimed process 0 (JAX's abort). They are saved unset; each launch gives its own."""
    from easytrain.trainers.run_dir import rerun_arguments

    launched = args_for(tmp_path / "run", coordinator_address="10.0.0.1:1234", num_processes=2, process_id=0)
    saved = rerun_arguments(launched)
    assert (saved.coordinator_address, saved.num_processes, saved.process_id) == (None, None, None)
    assert saved.resume_from_checkpoint == "latest" and saved.output_dir == launched.output_dir
