"""Logs linked to another disk before a run's first start (`metrics.jsonl`, `metrics.csv`, `tensorboard/` leading to
an empty file or directory there): the run writes through the links, and a fresh run that fails leaves them as it found
them, so that the same command line (or `latest` over a run stopped before its first checkpoint) logs to that disk
again instead of into plain files in output_dir."""

import os
from pathlib import Path

import pytest

from easytrain import BaseTrainer
from easytrain.errors import OutputDirError
from easytrain.trainers.claim import claim_output_dir
from easytrain.trainers.run_dir import check_output_dir

from runs import FailAt, args_for, logged

SINKS = ["jsonl", "csv", "tensorboard"]
LOGS = ("metrics.jsonl", "metrics.csv", "tensorboard")


def _link_logs(run: Path, disk: Path) -> dict[str, str]:
    """Each of `LOGS` in `run` a link to an empty file or directory on `disk`; returns every link's text."""
    run.mkdir()
    disk.mkdir()
    (disk / "tensorboard").mkdir()
    for name in LOGS[:2]:
        (disk / name).write_bytes(b"")
    for name in LOGS:
        (run / name).symlink_to(disk / name, target_is_directory=name == "tensorboard")
    return {name: os.readlink(run / name) for name in LOGS}


def _links(run: Path) -> dict[str, str]:
    return {p.name: os.readlink(p) for p in run.iterdir() if p.is_symlink()}


def _contents(disk: Path) -> dict[str, object]:
    """What the logs on `disk` hold: the files' bytes, the directory's entries."""
    return {name: sorted(p.name for p in (disk / name).iterdir()) if name == "tensorboard"
            else (disk / name).read_bytes() for name in LOGS}


class FailsToCompile(BaseTrainer):
    """The first train step fails while it is built: nothing trained."""

    def plan_memory(self, state, batch):
        raise MemoryError("the step does not fit")


def test_an_empty_linked_log_is_no_other_runs_and_the_run_writes_through_it(tmp_path):
    links = _link_logs(tmp_path / "run", tmp_path / "disk")
    BaseTrainer(args_for(tmp_path / "run", report_to=SINKS, max_steps=2)).train()
    assert _links(tmp_path / "run") == links
    assert sorted(logged(tmp_path / "disk")) == [1, 2], "the steps reach the other disk"
    assert (tmp_path / "disk" / "metrics.csv").read_text().startswith("step,split,time")
    assert any((tmp_path / "disk" / "tensorboard").iterdir())


def test_a_linked_log_holding_records_is_still_another_runs(tmp_path):
    _link_logs(tmp_path / "run", tmp_path / "disk")
    (tmp_path / "disk" / "metrics.jsonl").write_text('{"step": 1, "split": "train"}\n')
    with pytest.raises(OutputDirError, match="holds another run's metrics.jsonl \\("):
        check_output_dir(args_for(tmp_path / "run", report_to=SINKS))


def test_a_fresh_run_failing_before_its_first_step_leaves_the_links_as_it_found_them(tmp_path):
    """The links stay, what the run wrote through them goes (the targets empty again, as the check found them); the
    same command line then trains, through them."""
    links = _link_logs(tmp_path / "run", tmp_path / "disk")
    args = args_for(tmp_path / "run", report_to=SINKS, max_steps=2)
    with pytest.raises(MemoryError):
        FailsToCompile(args).train()
    assert _links(tmp_path / "run") == links
    assert _contents(tmp_path / "disk") == {"metrics.jsonl": b"", "metrics.csv": b"", "tensorboard": []}
    BaseTrainer(args).train()
    assert _links(tmp_path / "run") == links and sorted(logged(tmp_path / "disk")) == [1, 2]


def test_latest_over_a_run_failed_before_its_first_checkpoint_keeps_the_links(tmp_path):
    """A fresh run that failed after its first step, before its first save: `latest` starts it over, emptying the
    linked logs through their links (held for `undo`, which puts their records back), and trains through them."""
    links = _link_logs(tmp_path / "run", tmp_path / "disk")
    args = args_for(tmp_path / "run", report_to=SINKS, max_steps=3, save_steps=3)
    with pytest.raises(RuntimeError, match="a failing callback"):
        BaseTrainer(args, callbacks=[FailAt(1)]).train()
    assert _links(tmp_path / "run") == links and sorted(logged(tmp_path / "disk")) == [1]
    failed = _contents(tmp_path / "disk")
    again = args_for(tmp_path / "run", report_to=SINKS, max_steps=3, save_steps=3, resume_from_checkpoint="latest")
    assert check_output_dir(again) is None
    held = claim_output_dir(again, None)
    assert _links(tmp_path / "run") == links
    assert _contents(tmp_path / "disk") == {"metrics.jsonl": b"", "metrics.csv": b"", "tensorboard": []}
    held.undo()
    assert _links(tmp_path / "run") == links and _contents(tmp_path / "disk") == failed
    BaseTrainer(again).train()
    assert _links(tmp_path / "run") == links and sorted(logged(tmp_path / "disk")) == [1, 2, 3]
    assert not (tmp_path / "run" / "replaced_run").exists()


@pytest.mark.parametrize("linked", [True, False])
def test_wandb_that_cannot_start_leaves_the_record_it_found(tmp_path, monkeypatch, linked):
    """A fresh run's W&B start failing (no API key) before the claim: the record there (an older run's, kept on another
    disk through a link or not) is as it was, the link too; none is left where there was none."""
    wandb = pytest.importorskip("wandb")
    from easytrain.errors import ArgumentError
    from easytrain.sinks import WandbSink

    def no_key(**kwargs):
        raise wandb.errors.UsageError("No API key configured.")

    monkeypatch.setattr(wandb, "init", no_key)
    run, record = tmp_path / "run", tmp_path / ("disk" if linked else "run") / "wandb_run.json"
    record.parent.mkdir(parents=True, exist_ok=True)
    run.mkdir(exist_ok=True)
    record.write_text('{"run_id": "older"}\n')
    if linked:
        (run / "wandb_run.json").symlink_to(record)
    with pytest.raises(ArgumentError, match="W&B could not start a run"):
        WandbSink(run, 0, {})
    assert (run / "wandb_run.json").is_symlink() == linked and record.read_text() == '{"run_id": "older"}\n'
    record.unlink()
    (run / "wandb_run.json").unlink(missing_ok=True)
    with pytest.raises(ArgumentError, match="W&B could not start a run"):
        WandbSink(run, 0, {})
    assert not os.path.lexists(run / "wandb_run.json")


@pytest.mark.parametrize("precompute", [True, False])
def test_a_dpo_run_is_refused_a_dangling_reference_cache_link_before_its_reference_pass(tmp_path, precompute):
    """The precomputed reference log-probs are cached in output_dir/reference_logps once the reference pass is done:
    a dangling link there is refused when the trainer is built (naming it), not after that pass; a run that writes no
    cache leaves the link alone."""
    from easytrain.trainers.dpo import DPOArguments, DPOTrainer
    from easytrain.trainers.dpo_reference import CACHE_DIRNAME

    (tmp_path / "run").mkdir()
    (tmp_path / "run" / CACHE_DIRNAME).symlink_to(tmp_path / "unmounted" / CACHE_DIRNAME)
    args = args_for(tmp_path / "run", save_strategy="no")
    if not precompute:
        DPOTrainer(args, DPOArguments(precompute_ref_log_probs=False))
        return
    with pytest.raises(OutputDirError, match=f"{CACHE_DIRNAME} links to '.*unmounted/{CACHE_DIRNAME}'.*does not exist"):
        DPOTrainer(args, DPOArguments(precompute_ref_log_probs=True))


def test_an_sft_run_is_refused_a_dangling_data_stats_link_before_its_data_work(tmp_path):
    from easytrain.trainers.sft import SFTTrainer

    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "sft_data_stats.json").symlink_to(tmp_path / "unmounted" / "sft_data_stats.json")
    with pytest.raises(OutputDirError, match="sft_data_stats.json links to '.*unmounted/sft_data_stats.json'"):
        SFTTrainer(args_for(tmp_path / "run", save_strategy="no"))


class OthersWriteThenFails(FailsToCompile):
    """While the run compiles its first step, something else writes into the linked targets (another run sharing the
    tensorboard/ folder, a line appended to the JSONL file) and the metrics.csv link is pointed at another file."""

    def plan_memory(self, state, batch):
        run = Path(self._arguments.output_dir)
        disk = run.parent / "disk"
        (disk / "tensorboard" / "other_run").mkdir()
        (disk / "tensorboard" / "other_run" / "events").write_bytes(b"another run's")
        with open(disk / "metrics.jsonl", "a") as log:
            log.write('{"step": 7, "split": "train"}\n')
        (disk / "elsewhere.csv").write_text("step,split,time\n3,train,1.0\n")
        (run / "metrics.csv").unlink()
        (run / "metrics.csv").symlink_to(disk / "elsewhere.csv")
        super().plan_memory(state, batch)


def test_a_failed_fresh_run_removes_only_what_it_wrote_through_the_links(tmp_path):
    """What others wrote into a linked target during the run, and a file the link was pointed at since, stay: the
    run removes its own TensorBoard event file and empties a linked file only while that holds nothing but its own."""
    _link_logs(tmp_path / "run", tmp_path / "disk")
    with pytest.raises(MemoryError):
        OthersWriteThenFails(args_for(tmp_path / "run", report_to=SINKS, max_steps=2)).train()
    disk = tmp_path / "disk"
    assert sorted(p.name for p in (disk / "tensorboard").iterdir()) == ["other_run"]
    assert (disk / "tensorboard" / "other_run" / "events").read_bytes() == b"another run's"
    assert (disk / "metrics.jsonl").read_text() == '{"step": 7, "split": "train"}\n'
    assert (disk / "elsewhere.csv").read_text() == "step,split,time\n3,train,1.0\n"
    assert (disk / "metrics.csv").read_bytes() == b"", "what the run wrote through the link before it moved"


def test_latest_over_a_linked_tensorboard_holds_only_the_runs_entries_and_undo_removes_only_its_own(tmp_path):
    """A tensorboard/ linked to a folder others write too: starting over moves the older run's event files (held,
    put back by `undo`), never another's folder there; `undo` removes the event file this process added, not what
    another wrote there meanwhile."""
    run, shared = tmp_path / "run", tmp_path / "shared"
    (shared / "other_run").mkdir(parents=True)
    (shared / "other_run" / "events").write_bytes(b"another run's")
    (shared / "events.out.tfevents.1.host.9.1").write_bytes(b"the older run's")
    run.mkdir()
    (run / "arguments.json").write_text("{}")
    (run / "tensorboard").symlink_to(shared, target_is_directory=True)
    args = args_for(run, report_to=["tensorboard"], resume_from_checkpoint="latest")
    held = claim_output_dir(args, None)
    assert sorted(p.name for p in shared.iterdir()) == ["other_run"]
    (shared / "third_run").mkdir()
    (shared / f"events.out.tfevents.2.host.{os.getpid()}.5").write_bytes(b"this run's")
    held.undo()
    assert sorted(p.name for p in shared.iterdir()) == ["events.out.tfevents.1.host.9.1", "other_run", "third_run"]
    assert (shared / "events.out.tfevents.1.host.9.1").read_bytes() == b"the older run's"
    claim_output_dir(args, None).settle()
    assert sorted(p.name for p in shared.iterdir()) == ["other_run", "third_run"]


@pytest.mark.parametrize("with_logs", [True, False], ids=["overwriting-a-run", "stats-alone"])
def test_an_sft_run_ending_before_its_first_step_leaves_the_older_runs_data_stats(tmp_path, with_logs):
    """sft_data_stats.json is written once the run has claimed output_dir, held with the older run's files: a run
    that overwrites another and fails before its first step leaves that run's stats as they were; so does a fresh
    run into a directory that holds nothing else of the older run (the claim moved nothing, and held nothing)."""
    from easytrain.trainers.sft import SFTTrainer

    class FailsToCompileSFT(SFTTrainer):
        plan_memory = FailsToCompile.plan_memory

    run = tmp_path / "run"
    run.mkdir()
    older = b'{"train": "the older run\'s"}'
    if with_logs:
        (run / "metrics.jsonl").write_text('{"step": 1, "split": "train"}\n')
    (run / "sft_data_stats.json").write_bytes(older)
    trainer = FailsToCompileSFT(args_for(run, overwrite_output_dir=with_logs, save_strategy="no", max_steps=1))
    assert (run / "sft_data_stats.json").read_bytes() == older, "not before the claim"
    with pytest.raises(MemoryError):
        trainer.train()
    assert (run / "sft_data_stats.json").read_bytes() == older
    expected = ["job.json", *(["metrics.jsonl"] if with_logs else []), "sft_data_stats.json"]  # job.json: how it ended
    left = sorted(p.name for p in run.iterdir() if p.name != ".easytrain.lock")
    assert left == expected, f"nothing else of the failed run left, nothing held: {left}"
    if with_logs:
        assert (run / "metrics.jsonl").read_text() == '{"step": 1, "split": "train"}\n'


def test_logs_a_killed_run_left_through_links_are_refused_naming_latest(tmp_path):
    """A run killed before its first step (nothing took back what it wrote) leaves records behind the links: a fresh
    run there is refused as for plain logs, naming `latest`, which starts that run over through the links
    (`--overwrite_output_dir` would move them away)."""
    run = tmp_path / "run"
    _link_logs(run, tmp_path / "disk")
    (run / "arguments.json").write_text("{}")
    (tmp_path / "disk" / "metrics.csv").write_text("step,split,time\n")
    with pytest.raises(OutputDirError, match="metrics.csv .*--resume_from_checkpoint latest to start that run over"):
        check_output_dir(args_for(run, report_to=SINKS))
    assert check_output_dir(args_for(run, report_to=SINKS, resume_from_checkpoint="latest")) is None
    (run / "arguments.json").unlink()
    with pytest.raises(OutputDirError, match="metrics.csv") as refused:
        check_output_dir(args_for(run, report_to=SINKS))
    assert "latest" not in str(refused.value), "no run started there to start over"


def test_a_log_that_holds_lines_when_its_sink_opens_is_never_taken_back(tmp_path):
    """Lines written into a linked file between the claim and the sinks' opening (a race the check cannot see): the
    sink counts nothing of it as the run's, so a failed run leaves it whole; its own event file alone goes."""
    from easytrain.reporting import Reporter
    from easytrain.trainers.run_dir import remove_unstarted_logs

    run = tmp_path / "run"
    _link_logs(run, tmp_path / "disk")
    (tmp_path / "disk" / "metrics.jsonl").write_text('{"step": 5}\n')
    (tmp_path / "disk" / "metrics.csv").write_text("step,split,time\n5,train,1.0\n")
    reporter = Reporter(output_dir=run, report_to=SINKS, total_steps=2, show_progress=False)
    reporter.log(1, {"loss": 1.0})
    reporter.close("failed")
    assert list(reporter.written_logs) == ["tensorboard"]
    remove_unstarted_logs(run, is_main_process=True, written=reporter.written_logs)
    assert (tmp_path / "disk" / "metrics.jsonl").read_text().startswith('{"step": 5}\n{"step": 1,')
    assert (tmp_path / "disk" / "metrics.csv").read_text().startswith("step,split,time,loss\n5,train,1.0,\n1,train,")
    assert list((tmp_path / "disk" / "tensorboard").iterdir()) == []


class OtherTraceThenFails(FailsToCompile):
    """Another run writes a trace into the linked tensorboard/ while this one builds its traced first step, which
    then fails."""

    def plan_memory(self, state, batch):
        other = Path(self.arguments.output_dir, "tensorboard", "plugins", "profile", "2026_01_01_00_00_00").resolve()
        other.mkdir(parents=True)
        (other / "host.xplane.pb").write_bytes(b"another run's trace")
        super().plan_memory(state, batch)


def test_the_trace_of_a_failed_first_step_through_a_linked_tensorboard_goes_with_its_event_file(tmp_path):
    """`profile_start_step 1`: the trace of a first step that failed is the run's as its event file is: both go (the
    same command line then starts through the link); a trace another run wrote there meanwhile stays."""
    run, disk = tmp_path / "run", tmp_path / "disk"
    links = _link_logs(run, disk)
    args = args_for(run, report_to=SINKS, max_steps=2, profile_steps=1, profile_start_step=1)
    with pytest.raises(MemoryError):
        FailsToCompile(args).train()
    assert _links(run) == links
    assert _contents(disk) == {"metrics.jsonl": b"", "metrics.csv": b"", "tensorboard": []}
    assert check_output_dir(args) is None
    with pytest.raises(MemoryError):
        OtherTraceThenFails(args).train()
    traces = disk / "tensorboard" / "plugins" / "profile"
    assert [p.name for p in (disk / "tensorboard").iterdir()] == ["plugins"]
    assert [p.name for p in traces.iterdir()] == ["2026_01_01_00_00_00"]
    assert [p.name for p in (traces / "2026_01_01_00_00_00").iterdir()] == ["host.xplane.pb"]
