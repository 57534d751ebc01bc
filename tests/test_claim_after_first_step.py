"""A run refused or failing before its first step never costs the older run in its output_dir: what the claim would
remove (`overwrite_output_dir`) or set aside (resuming an older step) is held, put back byte for byte if the run ends
before its first step is done, and removed or set aside for good once it is (`easytrain.trainers.held_run`)."""

import errno
import os
import shutil
import signal
from pathlib import Path

import pytest

from easytrain import BaseTrainer
from easytrain.checkpoint import finalized_steps
from easytrain.errors import DeviceMemoryError
from easytrain.jobs import read_job
from easytrain.trainers.held_run import REPLACED_DIRNAME, HeldRun, tracker_records
from easytrain.trainers import held_run, process_failure, run_lock
from easytrain.trainers.preemption import TrainingPreempted
from easytrain.trainers.claim import claim_output_dir
from easytrain.trainers.run_dir import SUPERSEDED_DIRNAME

from runs import args_for, snapshot
from sink_readers import tracker_env


class RefusedMemory(BaseTrainer):
    """A step that cannot fit the device: `plan_memory` refuses it, as `memory_plan.check_fits` does on a GPU."""

    def plan_memory(self, state, batch):
        raise DeviceMemoryError("the train step needs 80 GiB per device beyond its inputs (forced by the test)")


class BrokenLoss(BaseTrainer):
    """A bug in the user's loss that only the train step traces (evaluation passes `train=False`)."""

    def compute_loss(self, model, batch, rng, train, frozen):
        if train:
            raise ValueError("a bug in the loss (forced by the test)")
        return super().compute_loss(model, batch, rng, train, frozen)


class RefusedOnce(BaseTrainer):
    """A step refused at the first `train()`, as if the device were busy then, and fitting at the second."""

    refused = False

    def plan_memory(self, state, batch):
        if not self.refused:
            self.refused = True
            raise DeviceMemoryError("the device is busy (forced by the test)")
        return super().plan_memory(state, batch)


class StoppedWhileCompiling(BaseTrainer):
    """A SIGTERM while the first step compiles."""

    def plan_memory(self, state, batch):
        os.kill(os.getpid(), signal.SIGTERM)
        return super().plan_memory(state, batch)


def _with_export(run: Path) -> Path:
    """The older run as it ends: its checkpoints and logs, plus an export and the command's results."""
    (run / "final_model").mkdir()
    (run / "final_model" / "config.json").write_text('{"written_at_step": 4}')
    (run / "results.json").write_text('{"global_step": 4}')
    return run


def _everything(run: Path) -> dict[str, str]:
    """Every path (empty directories included) -> its file's digest ('' for a directory)."""
    return {str(p.relative_to(run)): "" for p in run.rglob("*")} | snapshot(run)


def _changed(run: Path, before: dict[str, str]) -> list[str]:
    """The paths of `run` that differ from `before` (added, removed or rewritten), but job.json: the record of the
    latest job there, which says how the failed run ended (`_ended_failed`)."""
    now = _everything(run)
    return sorted(path for path in before.keys() | now.keys() if before.get(path) != now.get(path)
                  and path != "job.json")


def _ended_failed(run: Path, message: str) -> bool:
    record = read_job(run)
    return record["status"] == "failed" and message in record["error"]["message"]


FAILURES = [(RefusedMemory, DeviceMemoryError, "80 GiB"), (BrokenLoss, ValueError, "a bug in the loss")]


def test_a_run_stopped_while_compiling_under_overwrite_keeps_the_older_run(run_copy):
    before = _everything(_with_export(run_copy))
    with pytest.raises(TrainingPreempted):
        StoppedWhileCompiling(args_for(run_copy, overwrite_output_dir=True, learning_rate=1e-3)).train()
    assert _changed(run_copy, before) == []
    assert read_job(run_copy)["status"] == "stopped"


@pytest.mark.parametrize(("trainer_class", "error", "message"), FAILURES, ids=["memory", "loss"])
def test_a_fresh_run_failing_before_step_one_under_overwrite_keeps_the_older_run(run_copy, trainer_class, error,
                                                                                 message):
    before = _everything(_with_export(run_copy))
    trainer = trainer_class(args_for(run_copy, overwrite_output_dir=True, learning_rate=1e-3, report_to=["jsonl",
                                                                                                     "csv"]))
    with pytest.raises(error, match=message):
        trainer.train()
    assert _changed(run_copy, before) == [], "the older run's checkpoints, logs, export and arguments, byte for byte"
    assert _ended_failed(run_copy, message)


@pytest.mark.parametrize(("trainer_class", "error", "message"), FAILURES, ids=["memory", "loss"])
def test_a_resume_of_an_older_step_failing_before_its_first_step_sets_nothing_aside(run_copy, trainer_class, error,
                                                                                    message):
    before = _everything(_with_export(run_copy))
    trainer = trainer_class(args_for(run_copy, resume_from_checkpoint=str(run_copy / "checkpoints" / "2"),
                                     report_to=["jsonl", "csv"]))  # a CSV log the older run did not keep
    with pytest.raises(error, match=message):
        trainer.train()
    assert not (run_copy / SUPERSEDED_DIRNAME).exists()
    assert finalized_steps(run_copy / "checkpoints") == [2, 4], "the newer checkpoint still in place"
    assert _changed(run_copy, before) == [], "its logs too: nothing past step 2 dropped"
    assert _ended_failed(run_copy, message)


def test_a_run_that_trains_still_removes_the_run_it_overwrites(run_copy):
    """At its second `train()`: the first, refused, gave the claim back, and the second claims again."""
    before = _everything(_with_export(run_copy))
    trainer = RefusedOnce(args_for(run_copy, overwrite_output_dir=True, max_steps=2))
    with pytest.raises(DeviceMemoryError):
        trainer.train()
    assert _changed(run_copy, before) == []
    trainer.train()
    assert finalized_steps(run_copy / "checkpoints") == [2]
    assert not (run_copy / "final_model").exists() and not (run_copy / "results.json").exists()
    assert not (run_copy / REPLACED_DIRNAME).exists(), "the held run is removed once the first step is done"
    assert not (run_copy / SUPERSEDED_DIRNAME).exists()


@pytest.mark.parametrize("resume", ["older step", "fresh"])
def test_a_claim_given_back_leaves_the_directory_as_it_was(run_copy, resume):
    """The claim alone, without training: undone, every file is back; settled, it is as the claim always left it."""
    before = _everything(_with_export(run_copy))
    overrides = (dict(resume_from_checkpoint=str(run_copy / "checkpoints" / "2")) if resume == "older step"
                 else dict(overwrite_output_dir=True))
    resumed = (run_copy / "checkpoints", 2) if resume == "older step" else None
    held = claim_output_dir(args_for(run_copy, **overrides), resumed)
    assert not (run_copy / "final_model").exists(), "claimed: the export is out of the way"
    (run_copy / "metrics.jsonl").write_text("")  # what the failed run's logs did to them
    held.undo()
    assert _changed(run_copy, before) == []
    held = claim_output_dir(args_for(run_copy, **overrides), resumed)
    held.settle()
    assert not (run_copy / REPLACED_DIRNAME).exists() and not (run_copy / "final_model").exists()
    assert (run_copy / SUPERSEDED_DIRNAME).exists() == (resume == "older step")


@pytest.mark.parametrize("overwrite", [False, True])
def test_what_a_killed_claim_held_is_named_and_removed_only_by_an_overwrite(tmp_path, caplog, overwrite):
    """A process killed between its claim and its first step left the older run in replaced_run/: the next start
    names it; only a run that overwrites the directory removes it, once its own first step is done."""
    run = tmp_path / "run"
    leftover = run / REPLACED_DIRNAME / "20240101-000000"
    (leftover / "checkpoints" / "4").mkdir(parents=True)
    (leftover / "checkpoints" / "4" / "state").write_text("the older run")
    with caplog.at_level("WARNING", logger="easytrain"):
        held = claim_output_dir(args_for(run, overwrite_output_dir=overwrite), None)
    assert any(str(leftover) in record.message for record in caplog.records)
    held.settle()
    assert leftover.exists() != overwrite


def test_a_resume_with_nothing_left_to_train_settles_its_claim(run_copy):
    """Resumed at its last step, the run ends without a step, as it should: it is done, so its claim is settled
    (the newer lineage stays set aside, the copies of the logs it kept go), never left in replaced_run/."""
    BaseTrainer(args_for(run_copy, resume_from_checkpoint=str(run_copy / "checkpoints" / "2"), max_steps=2)).train()
    assert not (run_copy / REPLACED_DIRNAME).exists()
    assert [p.name for p in (run_copy / SUPERSEDED_DIRNAME).glob("*/*")] == ["4"]


def test_a_claim_failing_midway_puts_back_what_it_had_moved(run_copy, monkeypatch):
    """A move the file system refuses (permissions) after others were made: the claim fails with the older run
    whole in its place, not split between output_dir and replaced_run/."""
    before = _everything(_with_export(run_copy))
    move = HeldRun.move

    def refusing_the_second(held, source, destination):
        if held.moves:
            raise PermissionError(13, "Permission denied (forced by the test)", str(source))
        return move(held, source, destination)

    monkeypatch.setattr(HeldRun, "move", refusing_the_second)
    with pytest.raises(PermissionError):
        claim_output_dir(args_for(run_copy, overwrite_output_dir=True), None)
    assert _changed(run_copy, before) == []


def test_a_fresh_run_failing_before_step_one_keeps_the_older_runs_tracker_record(run_copy, tmp_path, monkeypatch):
    """The metric trackers open before the claim, and a fresh run's MLflow sink records its new run in
    mlflow_run.json: failing before its first step, the older run's record is put back (resuming it continues
    its own MLflow run)."""
    pytest.importorskip("mlflow")
    for name, value in tracker_env(tmp_path).items():
        monkeypatch.setenv(name, value)
    (run_copy / "mlflow_run.json").write_text('{"run_id": "the older run", "tracking_uri": "file:///elsewhere"}')
    before = _everything(run_copy)
    with pytest.raises(DeviceMemoryError):
        RefusedMemory(args_for(run_copy, overwrite_output_dir=True, report_to=["jsonl", "mlflow"])).train()
    assert _changed(run_copy, before) == []


class EndedByAnotherProcess(BaseTrainer):
    """What the failure watcher does when another process failed before the first step: this process, blocked in
    the step's collectives, is ended (`process_failure.end_process`), here from the compile instead of its thread."""

    def plan_memory(self, state, batch):
        process_failure.end_process("process 1 failed: ValueError: a bug (forced by the test)", 0, 60.0)
        raise AssertionError("end_process returned")


def test_a_process_ended_for_another_process_failure_gives_the_older_run_back(run_copy, monkeypatch):
    before = _everything(_with_export(run_copy))
    left_at_exit: list[list[str]] = []

    def exit_process(status):  # `os._exit` ends the process at once: nothing of train() runs after it
        left_at_exit.append([path for path in _changed(run_copy, before) if path != run_lock.LOCK_FILENAME])
        raise SystemExit(status)

    monkeypatch.setattr(process_failure, "exit_process", exit_process)
    with pytest.raises(SystemExit):
        EndedByAnotherProcess(args_for(run_copy, overwrite_output_dir=True)).train()
    assert left_at_exit == [[]], "the older run put back before the process ended"


def test_a_claim_that_could_not_be_given_back_is_claimed_again(run_copy, monkeypatch):
    """An undo refused midway (permissions) leaves part of the older run in place: a later `train()` of the trainer
    claims the directory again, under its lock, instead of writing among those files."""

    def undo_refused_midway(held):  # the older run's checkpoints put back, then a refusal
        source, moved = next((source, moved) for source, moved in held.moves if source.name == "checkpoints")
        shutil.rmtree(source)
        shutil.move(moved, source)
        raise PermissionError(13, "Permission denied (forced by the test)")

    trainer = RefusedOnce(args_for(run_copy, overwrite_output_dir=True, max_steps=2))
    with monkeypatch.context() as patched:
        patched.setattr(HeldRun, "_undo", undo_refused_midway)
        with pytest.raises(DeviceMemoryError):
            trainer.train()
    assert finalized_steps(run_copy / "checkpoints") == [2, 4]
    trainer.train()
    assert finalized_steps(run_copy / "checkpoints") == [2]
    assert not (run_copy / REPLACED_DIRNAME).exists()


def test_a_run_whose_older_run_cannot_be_deleted_after_step_one_goes_on(run_copy, monkeypatch, caplog):
    """Deleting the held older run once the first step is done is refused (a read-only directory in it): a warning
    names what is left, the run finishes, and the next claim of the directory names it and deletes it."""
    rmtree = shutil.rmtree

    def refused_in_replaced_run(path, *args, **kwargs):
        if REPLACED_DIRNAME in Path(path).parts:
            raise PermissionError(13, "Permission denied (forced by the test)", str(path))
        return rmtree(path, *args, **kwargs)

    with monkeypatch.context() as patched, caplog.at_level("WARNING", logger="easytrain"):
        patched.setattr(shutil, "rmtree", refused_in_replaced_run)
        BaseTrainer(args_for(run_copy, overwrite_output_dir=True, max_steps=2)).train()
    assert read_job(run_copy)["status"] == "completed" and finalized_steps(run_copy / "checkpoints") == [2]
    [left] = (run_copy / REPLACED_DIRNAME).iterdir()
    assert any(str(left) in r.message and "the run goes on" in r.message for r in caplog.records)
    caplog.clear()
    with caplog.at_level("WARNING", logger="easytrain"):
        held = claim_output_dir(args_for(run_copy, resume_from_checkpoint="latest"), (run_copy / "checkpoints", 2))
    assert any(str(left) in r.message and "failed to delete" in r.message for r in caplog.records)
    held.settle()
    assert not (run_copy / REPLACED_DIRNAME).exists()


def test_a_killed_resumes_log_copies_are_named_as_such(run_copy, caplog):
    """A resume of an older step killed between its claim and its first step leaves in replaced_run/ only the copies
    of the logs it was to rewrite: the next start names them for what they are, not as an older run."""
    claim_output_dir(args_for(run_copy, resume_from_checkpoint=str(run_copy / "checkpoints" / "2")),
                     (run_copy / "checkpoints", 2))  # then killed: neither settled nor undone
    [left] = (run_copy / REPLACED_DIRNAME).iterdir()
    with caplog.at_level("WARNING", logger="easytrain"):
        claim_output_dir(args_for(run_copy, resume_from_checkpoint="latest"), (run_copy / "checkpoints", 2))
    [named] = [r.message for r in caplog.records if str(left) in r.message]
    assert "copies (*.before) of the logs" in named and "older runs" not in named


@pytest.mark.parametrize("resumed", [False, True], ids=["fresh", "resumed-from-elsewhere"])
def test_a_killed_fresh_runs_copies_of_an_older_runs_arguments_are_named_as_such(tmp_path, caplog, resumed):
    """A run that does not continue the directory's own checkpoints (a fresh one, or one resumed from a checkpoint
    elsewhere), into a directory holding only an older run's arguments.json, killed between its claim and its first
    step, leaves in replaced_run/ only that file's copy: the next start names it as a copy of a file such a run
    replaced as it started, not as logs a resume of an older step rewrote, nor always as a fresh run's."""
    (output_dir := tmp_path / "run").mkdir()
    (output_dir / "arguments.json").write_text('{"learning_rate": 0.5}')
    resume = (tmp_path / "elsewhere" / "checkpoints", 2) if resumed else None
    claim_output_dir(args_for(output_dir), resume)  # then killed: neither settled nor undone
    [left] = (output_dir / REPLACED_DIRNAME).iterdir()
    with caplog.at_level("WARNING", logger="easytrain"):
        claim_output_dir(args_for(output_dir), None)
    [named] = [r.message for r in caplog.records if str(left) in r.message]
    assert "arguments.json" in named and "a resume of an older step" not in named, named
    assert "resumed from a checkpoint elsewhere" in named, named


def test_a_fresh_run_failing_before_step_one_leaves_no_wandb_folder(run_copy, tmp_path, monkeypatch):
    """W&B opens before the claim and writes its offline run under output_dir/wandb/: an older run that kept none
    gets none from the failed run."""
    pytest.importorskip("wandb")
    for name, value in tracker_env(tmp_path).items():
        monkeypatch.setenv(name, value)
    before = _everything(run_copy)
    with pytest.raises(DeviceMemoryError):
        RefusedMemory(args_for(run_copy, overwrite_output_dir=True, report_to=["jsonl", "wandb"])).train()
    assert _changed(run_copy, before) == []


def test_a_leftover_this_user_cannot_list_is_named_not_a_failed_claim(run_copy, monkeypatch, caplog):
    """What another user's killed claim left in replaced_run/ may be unreadable here (forced by the test: root reads
    anything): the claim names it as an older run, as before leftovers were told apart, instead of failing."""
    left = run_copy / REPLACED_DIRNAME / "20240101-000000"
    left.mkdir(parents=True)
    iterdir = Path.iterdir

    def refused(path):
        if path == left:
            raise PermissionError(13, "Permission denied (forced by the test)", str(path))
        return iterdir(path)

    monkeypatch.setattr(Path, "iterdir", refused)
    with caplog.at_level("WARNING", logger="easytrain"):
        claim_output_dir(args_for(run_copy, resume_from_checkpoint="latest"), (run_copy / "checkpoints", 4))
    assert any(str(left) in r.message and "older runs" in r.message for r in caplog.records)


def test_a_claim_in_the_second_of_a_failed_deletion_still_deletes_its_held_run(tmp_path, monkeypatch):
    """A claim named `<time>` like an earlier one whose deletion failed (`<time>.deleting`: a rerun within the same
    second) renames its own held run elsewhere at settle, and both go."""
    run = tmp_path / "run"
    (run / REPLACED_DIRNAME / "20240101-000000.deleting").mkdir(parents=True)
    (run / REPLACED_DIRNAME / "20240101-000000.deleting" / "left").write_text("")
    (run / "metrics.jsonl").write_text("")
    monkeypatch.setattr(held_run.time, "strftime", lambda _: "20240101-000000")
    held = claim_output_dir(args_for(run, overwrite_output_dir=True), None)
    assert sorted(p.name for p in (run / REPLACED_DIRNAME).iterdir()) == ["20240101-000000", "20240101-000000.deleting"]
    held.settle()
    assert not (run / REPLACED_DIRNAME).exists()


def test_undo_puts_the_older_run_back_when_the_failed_runs_wandb_folder_cannot_go(tmp_path, monkeypatch, caplog):
    """W&B may still write its offline run into wandb/ while the claim is undone (a claim refused midway, or the
    failure watcher's undo): its removal failing is a warning, and the older run still goes back."""
    run = tmp_path / "run"
    (run / "checkpoints" / "2").mkdir(parents=True)
    (run / "checkpoints" / "2" / "state").write_text("older")
    held = HeldRun(run, records=tracker_records(run))  # read before W&B opens: no wandb/ there
    held.remove(run / "checkpoints")  # as an overwrite's claim does
    (run / "wandb" / "offline-run").mkdir(parents=True)
    rmtree = shutil.rmtree

    def still_written(path, *args, **kwargs):
        if Path(path).name == "wandb":
            raise OSError(errno.ENOTEMPTY, "Directory not empty (forced by the test)", str(path))
        return rmtree(path, *args, **kwargs)

    monkeypatch.setattr(shutil, "rmtree", still_written)
    with caplog.at_level("WARNING", logger="easytrain"):
        held.undo()
    assert (run / "checkpoints" / "2" / "state").read_text() == "older"
    assert any(str(run / "wandb") in r.message for r in caplog.records)
