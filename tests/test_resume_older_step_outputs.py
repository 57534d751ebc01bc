"""Resuming an older step abandons the run's newer lineage: its exported model (final_model) and the command's
results.json go to superseded_checkpoints/<time>/ with its newer checkpoints, so output_dir never shows weights of a
lineage its checkpoints no longer continue. Resuming the newest step abandons nothing and moves nothing."""

import logging

from easytrain import BaseTrainer
from easytrain.trainers.claim import set_aside_newer_checkpoints

from runs import StopAt, args_for, snapshot


def _finish_with_outputs(run):
    """The outputs a run's end writes after its step-4 checkpoint: the export and the command's results."""
    (run / "final_model").mkdir()
    (run / "final_model" / "config.json").write_text('{"written_at_step": 4}')
    (run / "results.json").write_text('{"global_step": 4}')
    return snapshot(run / "final_model"), (run / "results.json").read_text()


def test_resuming_an_older_step_moves_the_abandoned_export_and_results_aside(run_copy, caplog):
    export, results = _finish_with_outputs(run_copy)
    trainer = BaseTrainer(args_for(run_copy, resume_from_checkpoint=str(run_copy / "checkpoints" / "2")),
                          callbacks=[StopAt(3)])
    with caplog.at_level(logging.WARNING, logger="easytrain"):
        trainer.train()  # continues from 2 and stops after step 3, before this lineage exports anything
    assert not (run_copy / "final_model").exists() and not (run_copy / "results.json").exists()
    (aside,) = (run_copy / "superseded_checkpoints").iterdir()
    assert sorted(p.name for p in aside.iterdir()) == ["4", "final_model", "results.json"]
    assert snapshot(aside / "final_model") == export and (aside / "results.json").read_text() == results
    assert any("final_model" in r.message and "results.json" in r.message and str(aside) in r.message
               for r in caplog.records)


def test_the_newest_step_resumed_leaves_the_export_in_place(run_copy):
    export, results = _finish_with_outputs(run_copy)
    assert set_aside_newer_checkpoints(run_copy, run_copy / "checkpoints", 4) == []
    assert snapshot(run_copy / "final_model") == export and (run_copy / "results.json").read_text() == results
    assert not (run_copy / "superseded_checkpoints").exists()


def test_only_the_outputs_present_are_moved(run_copy):
    (run_copy / "results.json").write_text('{"global_step": 4}')
    moved = set_aside_newer_checkpoints(run_copy, run_copy / "checkpoints", 2)
    assert sorted(p.name for p in moved) == ["4", "results.json"]
    assert all(p.parent.parent == run_copy / "superseded_checkpoints" for p in moved)
    assert not (run_copy / "results.json").exists() and (run_copy / "metrics.jsonl").is_file()
