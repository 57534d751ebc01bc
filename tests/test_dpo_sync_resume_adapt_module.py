"""A TR-DPO reference moves with the policy, so it is checkpointed; a resume restores it into a module built as the
fresh run built it: through `adapt_module`, a subclass's override included. Built without the override, a
resumed run either was refused (a parameter the override adds, a dtype it casts to: the checkpoint "does not match")
or ran the restored weights under another module (a setting the override changes: other losses, without a word)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from dpo_fixtures import stopped_copy
from easytrain.trainers.dpo import DPOArguments, DPOTrainer
from runs import logged
from test_dpo_trainer import tiny_args


class AddsAParameter(DPOTrainer):
    def adapt_module(self, module):
        module = super().adapt_module(module)
        module.extra = nnx.Param(jnp.full((3,), 2.0))
        return module


class CastsTheHead(DPOTrainer):
    def adapt_module(self, module):
        module = super().adapt_module(module)
        module.lm_head.kernel.set_value(module.lm_head.kernel[...].astype(jnp.bfloat16))
        return module


class SetsRopeTheta(DPOTrainer):
    def adapt_module(self, module):
        module = super().adapt_module(module)
        module.rope_theta = 100.0
        return module


@pytest.mark.parametrize("trainer", [AddsAParameter, CastsTheHead, SetsRopeTheta],
                         ids=["a parameter added", "the head cast", "a setting changed"])
def test_a_tr_dpo_resume_restores_the_reference_into_the_adapted_module(tmp_path, trainer):
    common = dict(max_steps=2, save_strategy="steps", save_steps=1)  # stopped at 1, resumed for the synced step 2
    options = DPOArguments(sync_ref_model=True, ref_model_sync_steps=1, ref_model_mixup_alpha=0.5)
    straight = trainer(tiny_args(tmp_path / "straight", **common), options)
    straight.train()
    stopped_copy(tmp_path / "straight" / "run", tmp_path / "cut" / "run", step=1)
    resumed = trainer(tiny_args(tmp_path / "cut", resume_from_checkpoint="latest", **common), options)
    resumed.train()
    assert logged(tmp_path / "cut" / "run") == logged(tmp_path / "straight" / "run")
    ours, theirs = (jax.tree_util.tree_leaves_with_path(t.state.frozen["reference"]) for t in (resumed, straight))
    assert [path for path, _ in ours] == [path for path, _ in theirs]
    for (path, mine), (_, other) in zip(ours, theirs):
        assert mine.dtype == other.dtype, jax.tree_util.keystr(path)
        np.testing.assert_array_equal(np.asarray(mine), np.asarray(other), err_msg=jax.tree_util.keystr(path))
