"""Bad input fails before any compute, naming the field and the fix, and never touches checkpoints."""

from pathlib import Path

import datasets
import pytest

from easytrain import ArgumentError, BaseTrainer, OutputDirError, TrainingArguments
from easytrain.checkpoint import CheckpointNotFoundError
from easytrain.data import DataError
from runs import copied_run


def args_for(tmp_path, **overrides) -> TrainingArguments:
    values = dict(output_dir=str(tmp_path / "run"), max_length=16, train_batch_size=4, eval_batch_size=4,
                  max_steps=2, logging_steps=1, eval_strategy="no", save_strategy="steps", save_steps=2,
                  report_to=["none"], disable_progress_bar=True, save_pretrained_at_end=False)
    values.update(overrides)
    return TrainingArguments(**values)


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory) -> Path:
    """A finished 4-step run with checkpoints at steps 2 and 4, trained once for the tests that need an old run (of
    this module's `args_for`, in place of tests/conftest.py's shared run)."""
    args = args_for(tmp_path_factory.mktemp("finished"), max_steps=4)
    BaseTrainer(args).train()
    return Path(args.output_dir)


@pytest.fixture
def old_run(finished_run, tmp_path) -> Path:
    """A copy of `finished_run` at this test's `args_for(tmp_path).output_dir`."""
    return copied_run(finished_run, Path(args_for(tmp_path).output_dir))


def no_checkpoints(args) -> bool:
    return not (Path(args.output_dir) / "checkpoints").exists()


def test_dataset_without_the_text_column(tmp_path, tokenizer):
    data = datasets.Dataset.from_dict({"content": ["some words here"] * 50})
    args = args_for(tmp_path)
    with pytest.raises(DataError, match="content.*text_column"):
        BaseTrainer(args, tokenizer=tokenizer, dataset_train=data).setup()
    assert no_checkpoints(args)


def test_empty_dataset(tmp_path, tokenizer):
    data = datasets.Dataset.from_dict({"text": []})
    with pytest.raises(DataError, match="empty|no rows|0 rows"):
        BaseTrainer(args_for(tmp_path), tokenizer=tokenizer, dataset_train=data).setup()


def test_max_length_longer_than_the_model_allows(tmp_path):
    with pytest.raises(ArgumentError, match="max_length.*max_position_embeddings=1024"):
        BaseTrainer(args_for(tmp_path, max_length=4096)).setup()


def test_resume_path_that_does_not_exist(tmp_path):
    with pytest.raises(CheckpointNotFoundError, match="resume_from_checkpoint"):
        BaseTrainer(args_for(tmp_path, resume_from_checkpoint=str(tmp_path / "nope")))


def test_output_dir_holding_another_run_is_refused_then_overwritten_on_request(tmp_path):
    args = args_for(tmp_path)
    BaseTrainer(args).train()
    checkpoint = Path(args.output_dir) / "checkpoints" / "2"
    assert checkpoint.is_dir()
    with pytest.raises(OutputDirError, match="output_dir.*resume_from_checkpoint latest.*overwrite_output_dir"):
        BaseTrainer(args_for(tmp_path))
    assert checkpoint.is_dir(), "a refused run must leave existing checkpoints untouched"
    BaseTrainer(args_for(tmp_path, overwrite_output_dir=True)).train()


def test_output_dir_holding_a_finished_run_without_checkpoints_is_refused(tmp_path):
    """A run that saved no checkpoints still left its exported model and logs: a fresh run would overwrite them."""
    args = args_for(tmp_path, save_strategy="no", save_pretrained_at_end=True, report_to=["jsonl"])
    BaseTrainer(args).train()
    exported = Path(args.output_dir) / "final_model" / "model.safetensors"
    before = exported.read_bytes()
    with pytest.raises(OutputDirError, match=r"output_dir.*final_model.*metrics.jsonl.*--overwrite_output_dir"):
        BaseTrainer(args)
    assert exported.read_bytes() == before
    BaseTrainer(args_for(tmp_path, save_strategy="no", overwrite_output_dir=True)).train()
    assert not exported.exists(), "overwriting starts over: the old export goes with the old run"


@pytest.mark.parametrize("bad", ["mesh", "data", "max_length"])
def test_overwrite_keeps_the_old_run_when_the_new_one_is_refused(tmp_path, tokenizer, bad, old_run):
    """`overwrite_output_dir` removes the old run only once the new one has passed every check: a mesh
    that does not fit, a dataset without its column, a too-long `max_length` leave its checkpoints alone."""
    checkpoint = old_run / "checkpoints" / "2"
    metrics = old_run / "metrics.jsonl"
    before = sorted(p.name for p in old_run.iterdir())
    overrides = {"mesh": dict(data_parallel_size=2), "max_length": dict(max_length=4096)}.get(bad, {})
    data = datasets.Dataset.from_dict({"content": ["some words here"] * 50}) if bad == "data" else None
    with pytest.raises((ArgumentError, DataError)):
        trainer = BaseTrainer(args_for(tmp_path, overwrite_output_dir=True, **overrides), tokenizer=tokenizer,
                              dataset_train=data)
        trainer.train()
    assert checkpoint.is_dir(), f"a refused run ({bad}) must not remove the old run's checkpoints"
    assert sorted(p.name for p in old_run.iterdir()) == before
    assert metrics.exists() or "metrics.jsonl" not in before


@pytest.mark.parametrize("tracker", ["wandb", "mlflow"])
@pytest.mark.parametrize("how", ["overwrite", "resume an older step"])
def test_a_tracker_that_cannot_start_leaves_the_old_run_whole(tmp_path, monkeypatch, tracker, how, old_run):
    """W&B without an API key, an MLflow store it cannot use: found when the tracker opens, which comes before
    the output_dir is claimed (the old run removed, newer checkpoints moved aside)."""
    import easytrain.sinks as sinks

    pytest.importorskip(tracker)
    before = sorted(str(p.relative_to(old_run)) for p in old_run.rglob("*"))  # checkpoints at steps 2 and 4

    def not_configured(self, *args, **kwargs):
        raise RuntimeError(f"{tracker}: not configured")

    monkeypatch.setattr({"wandb": sinks.WandbSink, "mlflow": sinks.MlflowSink}[tracker], "__init__", not_configured)
    change = (dict(overwrite_output_dir=True) if how == "overwrite" else
              dict(resume_from_checkpoint=str(old_run / "checkpoints" / "2"), max_steps=6))
    with pytest.raises(RuntimeError, match="not configured"):
        BaseTrainer(args_for(tmp_path, report_to=[tracker], **change)).train()
    assert sorted(str(p.relative_to(old_run)) for p in old_run.rglob("*")) == before


@pytest.mark.parametrize("asks", [dict(load_best_model_at_end=True, metric_for_best_model="eval_loss"),
                                  dict(early_stopping_patience=2)], ids=["load_best", "early_stopping"])
def test_ranking_evaluations_without_evaluation_data_is_refused(tmp_path, tokenizer, asks):
    """Own training text and no held-out split: no evaluation runs, so nothing could rank checkpoints or stop."""
    data = datasets.Dataset.from_dict({"text": ["some words here and there"] * 64})
    args = args_for(tmp_path, eval_strategy="steps", eval_steps=2, validation_split_percentage=0, **asks)
    with pytest.raises(ArgumentError, match=rf"{next(iter(asks))}: .*no evaluation data.*validation"):
        BaseTrainer(args, tokenizer=tokenizer, dataset_train=data).setup()
    assert no_checkpoints(args)


def test_own_data_without_a_tokenizer(tmp_path):
    data = datasets.Dataset.from_dict({"text": ["hello world"] * 10})
    with pytest.raises(ArgumentError, match="tokenizer_name"):
        BaseTrainer(args_for(tmp_path), dataset_train=data).setup()


def test_batch_not_divisible_by_data_parallel_devices(tmp_path, monkeypatch):
    import easytrain.sharding as sharding

    monkeypatch.setattr(sharding, "data_parallel_size", lambda mesh: 3)
    with pytest.raises(ArgumentError, match="train_batch_size.*multiple of 3"):
        BaseTrainer(args_for(tmp_path)).setup()


def test_mesh_that_does_not_match_the_devices(tmp_path):
    with pytest.raises(ArgumentError, match="needs 2 devices but 1 are available"):
        BaseTrainer(args_for(tmp_path, data_parallel_size=2))


@pytest.mark.parametrize("names, axis_type, match", [
    (("data", "fsdp"), "Auto", r"configure_mesh.*lacks the axis 'tensor'.*make_mesh"),
    (("batch", "fsdp", "tensor"), "Auto", r"configure_mesh.*lacks the axis 'data'.*has 'batch'"),
    (("data", "fsdp", "tensor"), "Explicit", r"configure_mesh.*Explicit.*AxisType.Auto"),
])
def test_a_mesh_easytrain_cannot_lay_out_is_refused_by_name(tmp_path, names, axis_type, match):
    """`jax.make_mesh` makes Explicit axes by default; a mesh without easytrain's three axes, or with Explicit
    ones, failed deep inside placement (a KeyError, a sharding assertion) instead of naming the hook."""
    import jax
    import numpy as np
    from jax.sharding import AxisType, Mesh

    from easytrain import MeshError

    mesh = Mesh(np.asarray(jax.devices()[:1]).reshape((1,) * len(names)), names,
                axis_types=(getattr(AxisType, axis_type),) * len(names))

    class Trainer(BaseTrainer):
        def configure_mesh(self):
            return mesh

    args = args_for(tmp_path)
    with pytest.raises(MeshError, match=match):
        Trainer(args)
    assert no_checkpoints(args)


def test_tokenizer_without_pad_token_falls_back_to_eos_with_a_warning(tmp_path, tokenizer_dir, caplog, text_lines):
    from transformers import AutoTokenizer

    no_pad = AutoTokenizer.from_pretrained(tokenizer_dir)
    no_pad.pad_token = None
    data = datasets.Dataset.from_dict({"text": text_lines})
    trainer = BaseTrainer(args_for(tmp_path), tokenizer=no_pad, dataset_train=data)
    with caplog.at_level("WARNING", logger="easytrain"):
        trainer.setup()
    assert trainer.tokenizer.pad_token == trainer.tokenizer.eos_token
    assert "no pad token" in caplog.text


def test_a_second_run_in_an_output_dir_in_use_is_refused_before_it_writes(tmp_path):
    """Two runs started together in one empty output_dir both passed its checks and then wrote side by side. The
    lock is held as another process's would be (flock conflicts between open files, also in one process)."""
    import fcntl
    import subprocess
    import sys

    args = args_for(tmp_path, max_steps=2)
    Path(args.output_dir).mkdir(parents=True)
    holder = subprocess.Popen([sys.executable, "-c", (
        "import fcntl, sys, time; f = open(sys.argv[1], 'a+'); fcntl.flock(f, fcntl.LOCK_EX); f.write('pid 1 on x');"
        "f.flush(); print('held', flush=True); time.sleep(120)"), str(Path(args.output_dir) / ".easytrain.lock")],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(OutputDirError, match=r"in use by a run that is still training \(pid 1 on x holds"):
            BaseTrainer(args).train()
        assert sorted(p.name for p in Path(args.output_dir).iterdir()) == [".easytrain.lock"]  # nothing written
    finally:
        holder.kill()
        holder.wait()
    BaseTrainer(args_for(tmp_path, max_steps=2)).train()  # the holder died: its lock went with it
    with open(Path(args.output_dir) / ".easytrain.lock") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)  # released when train() returned
