"""Where a DPO run's reference weights come from, read how often, and checked on resume: `init_weights_from` is read
once for the reference and the policy (the policy takes a copy, never the reference's buffers, which the train
step would donate), and a reference rebuilt from a path on resume must be the weights the run started from."""

import shutil
from pathlib import Path

import jax
import numpy as np
import pytest

from easytrain import ArgumentError
from easytrain.trainers import init_weights
from easytrain.trainers.dpo import DPOArguments, DPOTrainer
from runs import StopAt, logged
from test_dpo_trainer import tiny_args
from test_lora_trainer import write_base


@pytest.fixture(scope="module")
def sources(tmp_path_factory) -> dict[str, Path]:
    """A base model and a 2-step full fine-tuning DPO run over it, to start from."""
    root = tmp_path_factory.mktemp("sources")
    base = write_base(root / "base")
    DPOTrainer(tiny_args(root / "full", max_steps=2, save_strategy="steps", save_steps=2,
                         model_name_or_path=str(base))).train()
    return {"base": base, "full": root / "full" / "run"}


def counted_reads(monkeypatch) -> list[str]:
    reads, read = [], init_weights.initialise_from
    monkeypatch.setattr(init_weights, "initialise_from", lambda source, *a, **k: reads.append(source) or read(
        source, *a, **k))
    return reads


def pointers(tree) -> set[int]:
    return {buffer.unsafe_buffer_pointer() for leaf in jax.tree.leaves(tree) for buffer in
            (shard.data for shard in leaf.addressable_shards)}


@pytest.mark.parametrize("precompute", [False, True], ids=["online", "precomputed"])
def test_init_weights_from_is_read_once_and_the_policy_owns_its_buffers(sources, tmp_path, monkeypatch, precompute):
    """Measured before: 2 reads online, 3 precomputed (once per split's reference, once for the policy). The run
    is bit for bit the one whose policy reads the source itself."""
    common = dict(model_name_or_path=str(sources["base"]), init_weights_from=str(sources["full"]), max_steps=3)
    options = DPOArguments(precompute_ref_log_probs=precompute)
    reads = counted_reads(monkeypatch)
    trainer = DPOTrainer(tiny_args(tmp_path / "once", **common), options)
    trainer.setup()
    assert len(reads) == 1, reads
    if not precompute:
        assert not pointers(trainer.state.params) & pointers(trainer.state.frozen["reference"]), "shared buffers"
    trainer.train()
    monkeypatch.setattr(init_weights, "put_weights", lambda *a, **k: None)  # every build reads the source itself
    again = DPOTrainer(tiny_args(tmp_path / "each", **common), options)
    again.train()
    assert len(reads) == 3  # 1 above, then the reference's read and the policy's
    assert logged(tmp_path / "once" / "run") == logged(tmp_path / "each" / "run")
    assert logged(tmp_path / "once" / "run")[1] == pytest.approx(np.log(2), abs=1e-6)
    for ours, theirs in zip(jax.tree.leaves(trainer.state), jax.tree.leaves(again.state), strict=True):
        np.testing.assert_array_equal(np.asarray(ours), np.asarray(theirs))


@pytest.mark.parametrize("how", ["default", "precomputed", "explicit"])
def test_a_resume_refuses_a_reference_path_whose_weights_changed(sources, tmp_path, how):
    """The reference is rebuilt from model_name_or_path (or ref_model_name_or_path) on resume, not checkpointed:
    other weights there since the run's start are refused, naming the path, not silently taken as its reference."""
    weights = shutil.copytree(sources["base"], tmp_path / "weights")
    field = "ref_model_name_or_path" if how == "explicit" else "model_name_or_path"
    common = dict(model_name_or_path=str(sources["base"] if how == "explicit" else weights), max_steps=2,
                  save_strategy="steps", save_steps=1)
    options = DPOArguments(precompute_ref_log_probs=how == "precomputed",
                           ref_model_name_or_path=str(weights) if how == "explicit" else None)
    DPOTrainer(tiny_args(tmp_path, **common), options, callbacks=[StopAt(1)]).train()
    shutil.rmtree(weights)
    write_base(weights, seed=1)  # same architecture, other weights
    with pytest.raises(ArgumentError, match=f"{field}: the reference weights read from {weights}.* differ from "
                                            "those this run started from"):
        DPOTrainer(tiny_args(tmp_path, resume_from_checkpoint="latest", **common), options).setup()
    shutil.rmtree(weights)
    shutil.copytree(sources["base"], weights)  # the weights it started from: resumes
    DPOTrainer(tiny_args(tmp_path, resume_from_checkpoint="latest", **common), options).train()
    assert set(logged(tmp_path / "run")) == {1, 2}


def test_evaluating_another_set_after_training_keeps_no_copy_of_the_source(sources, tmp_path):
    """With precomputed log-probs, evaluate(dataset) builds the reference once more from init_weights_from; the
    values read for it have no policy left to take them, so they must not stay alive with the trainer."""
    import datasets

    common = dict(model_name_or_path=str(sources["base"]), init_weights_from=str(sources["full"]), max_steps=1)
    trainer = DPOTrainer(tiny_args(tmp_path / "eval", **common), DPOArguments(precompute_ref_log_probs=True))
    trainer.train()
    trainer.evaluate(datasets.Dataset.from_dict({"prompt": ["12+7=", "3+4="], "chosen": ["19", "7"],
                                                 "rejected": ["91", "8"]}))
    assert trainer._source_weights is None
