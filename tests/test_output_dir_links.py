"""Links in an output_dir (a `checkpoints/` or log directory linked to a scratch disk, a link whose target is gone):
whatever removes or moves things there (`run_dir.remove`, the claim, `HeldRun.settle` and `undo`) takes the link
itself, never what it points to."""

import errno
import os
import shutil
from pathlib import Path

import pytest

from easytrain import BaseTrainer
from easytrain.checkpoint import finalized_steps
from easytrain.errors import OutputDirError
from easytrain.reporting import claim_log_files, truncate_jsonl
from easytrain.trainers.claim import claim_output_dir
from easytrain.trainers.held_run import REPLACED_DIRNAME
from easytrain.linked_logs import WrittenLog, opened
from easytrain.trainers.run_dir import SUPERSEDED_DIRNAME, check_output_dir, remove, remove_unstarted_logs

from runs import args_for


def _linked(link: Path, target: Path) -> Path:
    """`link` made a link to `target` (a directory holding one file), which is returned."""
    target.mkdir(parents=True)
    (target / "kept").write_text("behind the link")
    link.symlink_to(target, target_is_directory=True)
    return target


def _dangling(link: Path) -> Path:
    link.symlink_to(link.parent / "gone-target")
    return link


def _links(run: Path) -> dict[str, str]:
    """Every link under `run` (not followed) -> what it points to."""
    return {str(p.relative_to(run)): os.readlink(p) for p in run.rglob("*") if p.is_symlink()}


def test_remove_takes_the_link_and_leaves_its_target(tmp_path):
    target = _linked(tmp_path / "checkpoints", tmp_path / "scratch")
    remove(tmp_path / "checkpoints")
    remove(_dangling(tmp_path / "tensorboard"))
    assert not os.path.lexists(tmp_path / "checkpoints") and not os.path.lexists(tmp_path / "tensorboard")
    assert (target / "kept").read_text() == "behind the link"


def test_a_fresh_runs_unstarted_logs_through_links_lose_what_it_wrote_and_the_links_stay(tmp_path):
    """A log linked to another disk (admitted only empty: `holds_records`) stays linked, what the run wrote through it
    goes (`written`: its event file, the bytes of a file holding nothing else), what another wrote there stays; a
    plain one goes; a dangling link is not one the run wrote through (`check_links` refuses those): it stays."""
    run = tmp_path / "run"
    run.mkdir()
    target = _linked(run / "tensorboard", tmp_path / "scratch")  # "kept": another's
    (target / "events.out.tfevents.1.host.2.3").write_bytes(b"the run's")
    (tmp_path / "scratch.csv").write_text("step,split,time\n")
    (tmp_path / "scratch.jsonl").write_text('{"step": 0}\n{"step": 9}\n')  # one line the run's, one another's
    (run / "metrics.csv").symlink_to(tmp_path / "scratch.csv")
    (run / "metrics.jsonl").symlink_to(tmp_path / "scratch.jsonl")
    links = _links(run)
    written = {"tensorboard": opened(target / "events.out.tfevents.1.host.2.3", created=True),
               "metrics.csv": WrittenLog(tmp_path / "scratch.csv", size=16),
               "metrics.jsonl": WrittenLog(tmp_path / "scratch.jsonl", size=12)}
    remove_unstarted_logs(run, is_main_process=True, written=written)
    assert _links(run) == links and sorted(p.name for p in run.iterdir()) == sorted(links)
    assert [p.name for p in target.iterdir()] == ["kept"] and (tmp_path / "scratch.csv").read_bytes() == b""
    assert (tmp_path / "scratch.jsonl").read_text() == '{"step": 0}\n{"step": 9}\n'
    (run / "metrics.jsonl").unlink()
    _dangling(run / "metrics.jsonl")
    (run / "tensorboard").unlink()
    (run / "tensorboard").mkdir()
    remove_unstarted_logs(run, is_main_process=True, written=written)
    assert not os.path.lexists(run / "tensorboard") and (run / "metrics.jsonl").is_symlink()


def test_an_overwrite_moves_linked_checkpoints_and_dangling_links_and_never_empties_their_targets(run_copy, tmp_path,
                                                                                                   caplog):
    """The older run's `checkpoints/` a link to a scratch disk: the claim holds the link, `undo` puts it back as it
    was, `settle` removes the link alone (the older run's checkpoints stay on the scratch disk, named in the log)."""
    scratch = tmp_path / "scratch"
    os.rename(run_copy / "checkpoints", scratch)
    (run_copy / "checkpoints").symlink_to(scratch, target_is_directory=True)
    _dangling(run_copy / "final_model")
    links = _links(run_copy)
    args = args_for(run_copy, overwrite_output_dir=True)
    held = claim_output_dir(args, None)
    assert not os.path.lexists(run_copy / "checkpoints") and not os.path.lexists(run_copy / "final_model")
    held.undo()
    assert _links(run_copy) == links
    held = claim_output_dir(args, None)
    with caplog.at_level("WARNING", logger="easytrain"):
        held.settle()
    assert _links(run_copy) == {} and not (run_copy / REPLACED_DIRNAME).exists()
    assert any(str(scratch) in r.message and "left as it was" in r.message for r in caplog.records)
    assert finalized_steps(scratch) == [2, 4], "the data behind the link is never deleted through it"


def test_a_run_overwriting_linked_checkpoints_trains_into_its_own(run_copy, tmp_path):
    scratch = tmp_path / "scratch"
    os.rename(run_copy / "checkpoints", scratch)
    (run_copy / "checkpoints").symlink_to(scratch, target_is_directory=True)
    BaseTrainer(args_for(run_copy, overwrite_output_dir=True, max_steps=2)).train()
    assert not (run_copy / "checkpoints").is_symlink() and finalized_steps(run_copy / "checkpoints") == [2]
    assert finalized_steps(scratch) == [2, 4]


def test_a_resume_of_an_older_step_sets_aside_through_linked_checkpoints(run_copy, tmp_path):
    """Resuming step 2 of a run whose checkpoints/ is a link: its step 4 (a link itself here), a dangling step link
    (it would block that step's save) and a dangling export link are set aside, and put back by `undo`."""
    scratch = tmp_path / "scratch"
    os.rename(run_copy / "checkpoints", scratch)
    (run_copy / "checkpoints").symlink_to(scratch, target_is_directory=True)
    os.rename(scratch / "4", tmp_path / "step-4")
    (scratch / "4").symlink_to(tmp_path / "step-4", target_is_directory=True)
    _dangling(scratch / "6")
    _dangling(run_copy / "final_model")
    links = _links(run_copy) | _links(scratch)
    args = args_for(run_copy, resume_from_checkpoint=str(run_copy / "checkpoints" / "2"))
    held = claim_output_dir(args, (run_copy / "checkpoints", 2))
    assert sorted(p.name for p in scratch.iterdir()) == ["2"]
    held.undo()
    assert _links(run_copy) | _links(scratch) == links and not (run_copy / SUPERSEDED_DIRNAME).exists()
    held = claim_output_dir(args, (run_copy / "checkpoints", 2))
    held.settle()
    [aside] = (run_copy / SUPERSEDED_DIRNAME).iterdir()
    assert sorted(p.name for p in aside.iterdir()) == ["4", "6", "final_model"]
    assert any((tmp_path / "step-4").iterdir()), "step 4 itself never touched"


def test_settle_removes_a_linked_leftover_and_leaves_its_target(tmp_path):
    """What a killed claim left in replaced_run/ may be a link (moved there as the older run's checkpoints/ was):
    the next overwrite removes the link once its first step is done."""
    run = tmp_path / "run"
    (run / REPLACED_DIRNAME).mkdir(parents=True)
    target = _linked(run / REPLACED_DIRNAME / "20240101-000000", tmp_path / "scratch")
    _dangling(run / REPLACED_DIRNAME / "20240101-000001")
    held = claim_output_dir(args_for(run, overwrite_output_dir=True), None)
    held.settle()
    assert not (run / REPLACED_DIRNAME).exists() and (target / "kept").exists()


@pytest.mark.parametrize("name", ["checkpoints", "final_model", "metrics.jsonl"])
def test_a_dangling_link_where_the_run_writes_is_refused_before_anything_is_written(tmp_path, name):
    """A `checkpoints/` linked to a scratch disk not mounted: refused by the check, naming the link and its target,
    not by a FileExistsError once the run is set up."""
    run = tmp_path / "run"
    run.mkdir()
    _dangling(run / name)
    with pytest.raises(OutputDirError, match=f"{name} links to '.*gone-target'.*does not exist"):
        check_output_dir(args_for(run, save_pretrained_at_end=True))
    assert sorted(p.name for p in run.iterdir()) == [name]


def test_a_run_started_over_removes_its_dangling_log_links(tmp_path):
    """`latest` over a run stopped before its first checkpoint starts it over, removing its logs, links too."""
    run = tmp_path / "run"
    run.mkdir()
    (run / "arguments.json").write_text("{}")
    _dangling(run / "metrics.jsonl")
    args = args_for(run, resume_from_checkpoint="latest")
    assert check_output_dir(args) is None
    claim_output_dir(args, None).settle()
    assert not os.path.lexists(run / "metrics.jsonl")


def test_a_resume_under_overwrite_is_refused_a_dangling_link_it_keeps(run_copy):
    """`overwrite_output_dir` moves the older run's outputs away on a fresh start only: a run resuming its own
    checkpoints keeps them where they are, so a dangling metrics.jsonl there is refused as without it (it would fail
    the run at its first log, after its set-up), and the refusal does not offer the flag that did not help."""
    (run_copy / "metrics.jsonl").unlink()
    _dangling(run_copy / "metrics.jsonl")
    with pytest.raises(OutputDirError, match="metrics.jsonl links to") as refused:
        check_output_dir(args_for(run_copy, resume_from_checkpoint="latest", overwrite_output_dir=True))
    assert "overwrite_output_dir" not in str(refused.value)
    assert check_output_dir(args_for(run_copy, overwrite_output_dir=True)) is None  # the claim moves the link away


def test_settle_names_where_a_relative_link_pointed(tmp_path, caplog):
    """A relative link (`checkpoints -> ../scratch`) no longer leads there once moved into replaced_run/: the log
    names its target as seen from where the link was."""
    run = tmp_path / "run"
    run.mkdir()
    target = _linked(run / "checkpoints", tmp_path / "scratch")
    (run / "checkpoints").unlink()
    (run / "checkpoints").symlink_to(Path("..") / "scratch", target_is_directory=True)
    held = claim_output_dir(args_for(run, overwrite_output_dir=True), None)
    with caplog.at_level("WARNING", logger="easytrain"):
        held.settle()
    assert any(f"a link to {target}:" in r.message for r in caplog.records)
    assert (target / "kept").exists()


def test_a_set_aside_copy_across_disks_that_fails_leaves_no_part_of_it(run_copy, tmp_path, monkeypatch):
    """Setting step 4 aside through a checkpoints/ linked to another disk is a copy (the disks forced by the test);
    one that fails midway (that disk full) refuses the claim and leaves no half checkpoint in superseded_checkpoints/;
    one that succeeds takes step 4 off the scratch disk, and `undo` copies it back."""
    scratch = tmp_path / "scratch"
    os.rename(run_copy / "checkpoints", scratch)
    (run_copy / "checkpoints").symlink_to(scratch, target_is_directory=True)
    rename, copyfile, copied = os.rename, shutil.copyfile, []

    def across_disks(source, destination, *args, **kwargs):
        if any(str(scratch) in os.path.realpath(path) for path in (source, destination)):
            raise OSError(errno.EXDEV, "Invalid cross-device link (forced by the test)")
        return rename(source, destination, *args, **kwargs)

    def disk_full_at_the_second_file(source, destination, *args, **kwargs):
        if copied:
            raise OSError(errno.ENOSPC, "No space left on device (forced by the test)")
        copied.append(source)
        return copyfile(source, destination, *args, **kwargs)

    monkeypatch.setattr(os, "rename", across_disks)
    monkeypatch.setattr(shutil, "copyfile", disk_full_at_the_second_file)
    args = args_for(run_copy, resume_from_checkpoint=str(run_copy / "checkpoints" / "2"))
    with pytest.raises(OSError, match="No space left"):
        claim_output_dir(args, (run_copy / "checkpoints", 2))
    assert copied and finalized_steps(scratch) == [2, 4]
    assert not (run_copy / SUPERSEDED_DIRNAME).exists()
    monkeypatch.setattr(shutil, "copyfile", copyfile)
    held = claim_output_dir(args, (run_copy / "checkpoints", 2))
    assert finalized_steps(scratch) == [2]
    held.undo()
    assert finalized_steps(scratch) == [2, 4] and not (run_copy / SUPERSEDED_DIRNAME).exists()


def test_undo_puts_back_a_log_that_was_a_link(run_copy, tmp_path):
    """A resume of an older step rewrites metrics.jsonl (`truncate_jsonl` writes through a link): where it was a link
    to a file elsewhere, `undo` puts back the target's lines, the link as it was."""
    target = tmp_path / "kept-logs" / "metrics.jsonl"
    target.parent.mkdir()
    os.rename(run_copy / "metrics.jsonl", target)
    (run_copy / "metrics.jsonl").symlink_to(target)
    logged = target.read_bytes()
    held = claim_output_dir(args_for(run_copy, resume_from_checkpoint=str(run_copy / "checkpoints" / "2")),
                            (run_copy / "checkpoints", 2))
    truncate_jsonl(run_copy / "metrics.jsonl", 2)  # as the resumed run's log does when it opens
    held.undo()
    assert os.readlink(run_copy / "metrics.jsonl") == str(target) and target.read_bytes() == logged


def test_a_resume_truncates_a_linked_log_through_its_link(tmp_path):
    """Logs linked to another disk stay linked across a resume: the records past the resumed step are dropped from
    the target, and the run's next lines reach it (not a plain file left in output_dir)."""
    target = tmp_path / "scratch" / "metrics.jsonl"
    target.parent.mkdir()
    target.write_text("".join(f'{{"step": {step}, "split": "train"}}\n' for step in (1, 2, 3, 4)))
    (tmp_path / "metrics.jsonl").symlink_to(target)
    truncate_jsonl(tmp_path / "metrics.jsonl", 2)
    assert os.readlink(tmp_path / "metrics.jsonl") == str(target)
    assert [line[:11] for line in target.read_text().splitlines()] == ['{"step": 1,', '{"step": 2,']
    assert sorted(p.name for p in target.parent.iterdir()) == ["metrics.jsonl"], "no temporary file left there"


def test_a_dangling_link_the_run_does_not_write_through_is_left_alone(tmp_path):
    """Only the links the run's own outputs go through are refused: a dangling tensorboard/ or wandb/ link where
    neither is reported to (nor a trace written: profile_steps; nor a final_model one, with no export) is left as it
    is, by the check and by the removal of a failed fresh run's logs."""
    run = tmp_path / "run"
    run.mkdir()
    links = {name: os.readlink(_dangling(run / name)) for name in ("tensorboard", "wandb", "final_model")}
    assert check_output_dir(args_for(run)) is None
    remove_unstarted_logs(run, is_main_process=True)
    assert _links(run) == links
    for name, report_to in (("tensorboard", ["jsonl", "tensorboard"]), ("wandb", ["wandb"])):
        with pytest.raises(OutputDirError, match=f"{name} links to '.*gone-target'"):
            check_output_dir(args_for(run, report_to=report_to))
    with pytest.raises(OutputDirError, match="final_model links to"):
        check_output_dir(args_for(run, save_pretrained_at_end=True))
    with pytest.raises(OutputDirError, match="tensorboard links to"):  # a trace goes there (`profiling.trace_dir`)
        check_output_dir(args_for(run, profile_steps=1))


def test_a_relative_step_link_set_aside_still_leads_to_its_step(run_copy, tmp_path):
    """A step directory that is a relative link (`checkpoints/4 -> ../../step-4`) keeps leading to that step once
    moved into superseded_checkpoints/<time>/, and once moved back from there by hand (to continue that lineage); `undo`
    puts back the text it had."""
    os.rename(run_copy / "checkpoints" / "4", tmp_path / "step-4")
    (run_copy / "checkpoints" / "4").symlink_to(Path("..") / ".." / "step-4", target_is_directory=True)
    args = args_for(run_copy, resume_from_checkpoint=str(run_copy / "checkpoints" / "2"))
    held = claim_output_dir(args, (run_copy / "checkpoints", 2))
    [aside] = (run_copy / SUPERSEDED_DIRNAME).iterdir()
    assert (aside / "4").is_symlink() and (aside / "4").resolve() == (tmp_path / "step-4").resolve()
    held.undo()
    assert os.readlink(run_copy / "checkpoints" / "4") == str(Path("..") / ".." / "step-4")
    claim_output_dir(args, (run_copy / "checkpoints", 2)).settle()
    [aside] = (run_copy / SUPERSEDED_DIRNAME).iterdir()  # named for the second of this claim, not the first's
    assert finalized_steps(aside) == [4], "the step set aside is found through its link"
    os.rename(aside / "4", run_copy / "checkpoints" / "4")  # the lineage continued: its steps moved back by hand
    assert finalized_steps(run_copy / "checkpoints") == [2, 4], "the link moved back by hand leads to its step"


@pytest.mark.parametrize("name, start", [(SUPERSEDED_DIRNAME, "resume step 2"), (REPLACED_DIRNAME, "overwrite"),
                                         ("arguments.json", "overwrite")])
def test_a_dangling_link_where_the_claim_moves_things_or_overwrite_keeps_is_refused_at_the_check(run_copy, name, start):
    """Where the claim moves the older run's files (superseded_checkpoints/ for a resume of an older step,
    replaced_run/ under overwrite_output_dir), and what overwrite_output_dir does not move away (arguments.json, the
    trackers' folders): a dangling link there is refused by the check, naming it, not by the claim once the run is set
    up; the refusal does not offer the flag that would not help. A resume that moves nothing leaves such a link be."""
    (run_copy / name).unlink(missing_ok=True)
    _dangling(run_copy / name)
    overrides = dict(resume_from_checkpoint=str(run_copy / "checkpoints" / "2")) if start == "resume step 2" else \
        dict(overwrite_output_dir=True)
    with pytest.raises(OutputDirError, match=f"{name} links to '.*gone-target'.*does not exist") as refused:
        check_output_dir(args_for(run_copy, **overrides))
    assert "overwrite_output_dir" not in str(refused.value)
    if name == SUPERSEDED_DIRNAME:
        assert check_output_dir(args_for(run_copy, resume_from_checkpoint="latest"))[1] == 4



def test_a_fresh_run_over_an_older_runs_arguments_is_refused_a_dangling_replaced_run_link(tmp_path):
    """A fresh run holds an older run's arguments.json in replaced_run/ even where nothing else of that run is
    there: a dangling replaced_run link is refused by the check, naming it, not by the claim once the run is set up
    (a raw FileExistsError); the older file is untouched."""
    (run := tmp_path / "run").mkdir()
    (run / "arguments.json").write_text('{"learning_rate": 0.5}')
    _dangling(run / REPLACED_DIRNAME)
    with pytest.raises(OutputDirError, match=f"{REPLACED_DIRNAME} links to '.*gone-target'.*does not exist"):
        check_output_dir(args_for(run))
    assert (run / "arguments.json").read_text() == '{"learning_rate": 0.5}'


def test_a_jobs_overwrite_of_linked_logs_takes_the_links_and_leaves_their_targets(tmp_path):
    """`job(..., overwrite_metrics=True)` starting fresh where logs are links (a tensorboard/ on a scratch disk)."""
    run = tmp_path / "run"
    run.mkdir()
    target = _linked(run / "tensorboard", tmp_path / "scratch")
    (tmp_path / "metrics.jsonl").write_text('{"step": 1}\n')
    (run / "metrics.jsonl").symlink_to(tmp_path / "metrics.jsonl")
    claim_log_files(run, ["jsonl", "tensorboard"], overwrite=True)
    assert list(run.iterdir()) == []
    assert (target / "kept").exists() and (tmp_path / "metrics.jsonl").exists()


def test_undo_leaves_a_dangling_tracker_record_link_the_run_did_not_write_through(run_copy):
    """A dangling `mlflow_run.json` link with MLflow off is not the run's (`check_links` refuses it only where the run
    writes it): the undo of a failed overwrite leaves it as it was, not removed as a record the run made."""
    from easytrain.trainers.held_run import HeldRun, tracker_records

    link = _dangling(run_copy / "mlflow_run.json")
    args = args_for(run_copy, overwrite_output_dir=True)
    check_output_dir(args)
    held = HeldRun(run_copy, records=tracker_records(run_copy))
    claim_output_dir(args, None, held)
    held.undo()
    assert link.is_symlink() and os.readlink(link) == str(run_copy / "gone-target")
