"""A TR-DPO reference moves with the policy, so a resume restores it from the checkpoint: only its shapes are needed
before that. Built from `model_name_or_path`, `ref_model_name_or_path` or `model=`, it was loaded (or copied) whole
first, the weights read from disk, and held while the checkpoint was restored: one copy of the weights more at the
resume's peak than the fresh run had. Now it is traced like the policy's restore target, and the resume stays the
unbroken run, bit for bit."""

import dataclasses
import gc

import jax
import numpy as np
import pytest

from dpo_fixtures import stopped_copy
from easytrain.models import hf_load
from easytrain.models.llama import init_model
from easytrain.trainers import state_hooks
from easytrain.trainers.dpo import DPOArguments, DPOTrainer
from model_configs import tiny_config
from runs import logged
from test_dpo_trainer import tiny_args
from test_lora_trainer import write_base

OPTIONS = DPOArguments(sync_ref_model=True, ref_model_sync_steps=1, ref_model_mixup_alpha=0.5)
COMMON = dict(max_steps=2, save_strategy="steps", save_steps=1)  # stopped at 1, resumed for the synced step 2


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return write_base(tmp_path_factory.mktemp("base") / "model")


def given_model():
    return init_model(tiny_config(vocab_size=256), seed=7)


#: How each start names its model: keyword arguments of the trainer (model=) or of its arguments.
STARTS = {
    "model_name_or_path": lambda base: ({}, dict(model_name_or_path=str(base))),
    "ref_model_name_or_path": lambda base: ({}, dict(model_name_or_path=str(base))),
    "model=": lambda base: ({"model": given_model()}, {}),
}


def options_for(start: str, base) -> DPOArguments:
    if start == "ref_model_name_or_path":  # the reference named on its own (the policy's model: the shapes mix)
        return dataclasses.replace(OPTIONS, ref_model_name_or_path=str(base))
    return OPTIONS


def live_bytes() -> int:
    gc.collect()  # earlier trainers hold device arrays until collected
    return sum(array.nbytes for array in jax.live_arrays())


@pytest.mark.usefixtures("collections_of_this_test")  # its gc.collect calls: this test's objects
@pytest.mark.parametrize("start", list(STARTS))
def test_a_tr_dpo_resume_builds_no_reference_only_to_restore_it(base, tmp_path, monkeypatch, start):
    options = options_for(start, base)
    trainer_kwargs, model_args = STARTS[start](base)
    straight = DPOTrainer(tiny_args(tmp_path / "straight", **COMMON, **model_args), options, **trainer_kwargs)
    straight.train()
    stopped_copy(tmp_path / "straight" / "run", tmp_path / "cut" / "run", step=1)
    weights = sum(leaf.nbytes for leaf in jax.tree.leaves(straight.state.params))

    read, at_restore = [], []
    place, restore = hf_load._place, state_hooks.restore_checkpoint
    monkeypatch.setattr(hf_load, "_place", lambda *a, **k: read.append(a[1]) or place(*a, **k))
    monkeypatch.setattr(state_hooks, "restore_checkpoint",
                        lambda *a, **k: at_restore.append(live_bytes()) or restore(*a, **k))
    trainer_kwargs, _ = STARTS[start](base)
    before = live_bytes()
    resumed = DPOTrainer(tiny_args(tmp_path / "cut", resume_from_checkpoint="latest", **COMMON, **model_args),
                         options, **trainer_kwargs)
    resumed.train()
    held = at_restore[0] - before  # live as the restore starts: a built reference is a whole copy of the weights
    assert not read and held < weights / 2, f"{len(read)} tensors read from disk, {held} bytes held of {weights}"
    assert logged(tmp_path / "cut" / "run") == logged(tmp_path / "straight" / "run")
    ours, theirs = (jax.tree_util.tree_leaves_with_path(t.state.frozen["reference"]) for t in (resumed, straight))
    assert [path for path, _ in ours] == [path for path, _ in theirs]
    for (path, mine), (_, other) in zip(ours, theirs):
        np.testing.assert_array_equal(np.asarray(mine), np.asarray(other), err_msg=jax.tree_util.keystr(path))
